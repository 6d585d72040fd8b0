"""Where the receiver lands the batches it takes: one module per sink, each a `Sink`
(`agent.cloud.sinks.base`), chosen by the `receive` command's options."""
