"""The wire: protobuf batches with a compressed columnar body (`proto/telemetry.proto`,
docs/wire-format.md). What both ends share is here: the envelope, the columns' encodings and
how batches travel; the device's encoder is `encoder`, the cloud's parser `agent.cloud`."""
