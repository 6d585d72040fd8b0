"""The commands: `decode`, `run`, `check-config`, `receive` and `campaign`, parsed and run."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Coroutine, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from agent import __version__
from agent.decode import (
    ALL_BUSES,
    DbcError,
    Decoder,
    bus_decoders,
    default_cache_dir,
    load_dbc,
)
from agent.exits import EX_CONFIG, EX_IOERR
from agent.logs import LogError, formats, open_log
from agent.memory import keep_freed_memory
from agent.records import WRITERS

if TYPE_CHECKING:
    from agent.cloud.sinks.base import Sink
    from agent.diagnostics.listener import AnswerListener, Heard
    from agent.records import Block

_BUS_NAME = re.compile(r"[A-Za-z0-9_.*-]+")


def parse_ecus_option(value: str) -> list[tuple[int, bool]]:
    """`0x7E8,0x7E9` -> the ECUs' response IDs, each with whether it is 29-bit (above
    0x7FF: 0x18DAF110)."""
    from agent.diagnostics.settings import ecu_problem

    ecus = []
    for part in value.split(","):
        try:
            ecu = int(part.strip(), 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is no CAN ID") from None
        extended = ecu > 0x7FF
        problem = ecu_problem(ecu, extended)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        ecus.append((ecu, extended))
    return ecus


def parse_dbc_option(value: str) -> tuple[str, str]:
    """`[BUS=]PATH` -> (bus, path); without `BUS=` the DBC applies to every bus."""
    bus, sep, path = value.partition("=")
    if sep and path and _BUS_NAME.fullmatch(bus) and not Path(value).exists():
        return bus, path
    return ALL_BUSES, value


@dataclass
class DecodeTotals:
    frames: int = 0
    decoded: int = 0
    unknown: int = 0
    error_frames: int = 0
    remote_frames: int = 0
    malformed: int = 0
    signals: int = 0

    def summary(self, elapsed: float) -> str:
        rate = self.frames / elapsed if elapsed > 0 else 0.0
        return (
            f"{self.frames} frames read, {self.decoded} decoded, {self.unknown} unknown, "
            f"{self.error_frames} error frames, {self.remote_frames} remote, "
            f"{self.malformed} malformed lines, {self.signals} signals "
            f"in {elapsed:.3f} s ({rate:,.0f} frames/s)"
        )


class Progress:
    """A progress line on stderr, with a bar where the reader knows how far it is; only
    when stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.last = 0.0

    WIDTH = 30

    def show(self, label: str, done: float | None, totals: DecodeTotals, started: float) -> None:
        """`done` is the fraction of the current log read, where its reader can tell."""
        now = time.perf_counter()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        rate = totals.frames / max(now - started, 1e-9)
        bar = ""
        if done is not None:
            filled = round(done * self.WIDTH)
            bar = f" [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done:4.0%}"
        line = f"\r{label}{bar} {totals.frames:,} frames, {rate:,.0f} frames/s\x1b[K"
        self.stream.write(line)
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")


def run_decode(args: argparse.Namespace) -> int:
    dbcs: dict[str, list[str]] = {}
    for bus, path in map(parse_dbc_option, args.dbc):
        dbcs.setdefault(bus, []).append(path)
    try:
        decoder = Decoder(dbcs, args.j1939, cache_dir=default_cache_dir())
    except DbcError as error:
        print(f"telemetry-agent decode: {error}", file=sys.stderr)
        return 2
    for warning in decoder.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    # J1939 buses: transfers reassembled and DM1/DM2 faults decoded, each after its last frame.
    listener = None
    if args.j1939:
        from agent.j1939 import J1939Listener

        listener = J1939Listener(decoder)
    # Diagnostic answers to others' requests: records of `<bus>.diagnostics`, each after the
    # frame that completed it.
    hearing: AnswerListener | None = None
    answers = decoder
    if args.obd_ecus:
        from agent.diagnostics.listener import AnswerListener
        from agent.diagnostics.streams import answers_dbc

        hearing = AnswerListener(ecu for ecus in args.obd_ecus for ecu in ecus)
        import tempfile

        with tempfile.TemporaryDirectory() as folder:  # read as the decoder is made
            dbc = answers_dbc(Path(folder))
            answers = Decoder({ALL_BUSES: [str(dbc)]}, cache_dir=default_cache_dir())
    totals = DecodeTotals()
    progress = Progress(sys.stderr)
    failed = False
    started = time.perf_counter()
    with ExitStack() as stack:
        out: TextIO = sys.stdout
        if args.output and args.format != "none":
            out = stack.enter_context(open(args.output, "w", encoding="utf-8", newline=""))
        writer = WRITERS[args.format](out, choices=args.choices) if args.format != "none" else None
        for log in args.logs:
            try:
                reader = open_log(log, args.log_format)
                for batch in reader.batches():
                    result = decoder.decode(batch)
                    totals.frames += result.frames
                    totals.decoded += result.decoded
                    totals.unknown += result.unknown
                    totals.error_frames += result.error_frames
                    totals.remote_frames += result.remote_frames
                    totals.signals += result.signals
                    groups: list[Block] = []
                    if listener is not None:
                        groups += listener.listen(batch, result)
                    if hearing is not None:
                        for heard in hearing.hear(batch):
                            groups += heard_blocks(answers, heard)
                    if writer is not None:
                        writer.write(result.blocks, after=groups)
                    progress.show(Path(log).name, reader.progress(), totals, started)
            except LogError as error:
                progress.clear()
                print(f"telemetry-agent decode: {error}", file=sys.stderr)
                failed = True
                continue
            totals.malformed += reader.stats.malformed
            progress.clear()
            for example in reader.stats.examples:
                print(f"warning: {log}: malformed {example}", file=sys.stderr)
        out.flush()
    if listener is not None:
        print(listener.summary(), file=sys.stderr)
    if hearing is not None:
        print(hearing.summary(), file=sys.stderr)
    print(totals.summary(time.perf_counter() - started), file=sys.stderr)
    return 1 if failed else 0


def heard_blocks(decoder: Decoder, heard: Heard) -> list[Block]:
    """The answers heard in a batch, decoded; each row the row of the batch's frame that
    completed its answer."""
    from agent.j1939.groups import GroupBlock

    return [
        GroupBlock(
            block.bus,
            block.plan.info,
            block.t_ns,
            block.can_id,
            block.signals,
            block.present,
            heard.rows[block.rows],
        )
        for block in decoder.decode(heard.frames).blocks
    ]


#: syslog priorities, which journald reads from a `<N>` prefix of each line.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


class OneLineFormatter(logging.Formatter):
    """One line per event, a traceback folded into it, so that a journal or a log file
    never holds a line that does not say what it belongs to; under systemd (JOURNAL_STREAM
    names our stderr) each line starts with its syslog priority for journald."""

    def __init__(self, journal: bool) -> None:
        super().__init__("telemetry-agent: %(levelname)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        if self.journal:
            level = max((lv for lv in _PRIORITIES if lv <= record.levelno), default=logging.DEBUG)
            priority = 2 if record.levelno >= logging.CRITICAL else _PRIORITIES[level]
            return f"<{priority}>{text}"
        return text


def _stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd gave us (JOURNAL_STREAM is device:inode
    of it; a child's redirected stderr no longer matches)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{status.st_dev}:{status.st_ino}" == f"{device}:{inode}"


def _log_to_stderr(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(_stderr_is_journal()))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # Their per-connection chatter is not the agent's news.
    for noisy in ("asyncio", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# The commands other than `decode` import what only they need when they run: asyncio, the
# config and the collection rules cost `decode` a fifth of its start-up.


def run_agent(args: argparse.Namespace) -> int:
    import asyncio

    from agent.collect import CollectError
    from agent.config import ConfigError, embedded_defaults, load_config

    _log_to_stderr(args.verbose)
    try:
        config = load_config(args.config) if args.config else embedded_defaults()
    except ConfigError as error:
        for problem in error.problems:
            print(f"telemetry-agent: {error.source}: {problem}", file=sys.stderr)
        return EX_CONFIG
    if args.verbose:
        config = replace(config, log_level="debug")
    # The daemon's imports are not needed by the other commands.
    from agent.service import Agent
    from agent.spool import SpoolError

    async def serve() -> int:
        # Made inside the event loop it runs in.
        path = Path(args.config) if args.config else None
        return await Agent(config, config_path=path).run()

    try:
        return asyncio.run(serve())
    except (DbcError, CollectError) as error:
        print(f"telemetry-agent: {config.source}: {error}", file=sys.stderr)
        return EX_CONFIG
    except SpoolError as error:
        print(f"telemetry-agent: {error}", file=sys.stderr)
        return EX_IOERR
    except OSError as error:
        print(f"telemetry-agent: {error}", file=sys.stderr)
        return 1


def run_check_config(args: argparse.Namespace) -> int:
    import tempfile

    from agent.collect import CollectError, Collector
    from agent.config import ConfigError, load_config
    from agent.diagnostics.streams import diagnostics_streams

    try:
        config = load_config(args.config)
    except ConfigError as error:
        for problem in error.problems:
            print(f"{error.source}: {problem}", file=sys.stderr)
        return EX_CONFIG
    problems = []
    for bus in config.buses:
        for path in bus.dbc:
            try:
                load_dbc(path, cache_dir=default_cache_dir())
            except DbcError as error:
                problems.append(f"bus {bus.name}: {error}")
    if not problems and config.collect:
        try:
            decoders = bus_decoders(config.buses, default_cache_dir())
            with tempfile.TemporaryDirectory() as folder:
                # Rules may select the ECUs' answers: their DBC, written aside.
                streams = diagnostics_streams(config, Path(folder))
                decoders.update(bus_decoders(streams, default_cache_dir()))
            Collector(config.collect, decoders)
        except CollectError as error:
            problems.append(str(error))
    for problem in problems:
        print(f"{args.config}: {problem}", file=sys.stderr)
    if problems:
        return EX_CONFIG
    print(f"{args.config}: OK ({len(config.buses)} buses, uplink {config.uplink.kind})")
    return 0


def run_receive(args: argparse.Namespace) -> int:
    import asyncio

    from agent.cloud import receiver
    from agent.config import TlsConfig

    _log_to_stderr()

    tls = None
    if args.ca_file or args.cert_file or args.key_file:
        tls = TlsConfig(
            *(Path(p) if p else None for p in (args.ca_file, args.cert_file, args.key_file))
        )
    with ExitStack() as stack:
        out: TextIO = sys.stdout
        if args.output:
            out = stack.enter_context(open(args.output, "w", encoding="utf-8"))
        batches = None
        if args.batches:
            batches = stack.enter_context(open(args.batches, "w", encoding="utf-8"))
        try:
            sink = _receiver_sink(args, out)
        except Exception as error:  # the database or the folder refused
            print(f"telemetry-agent receive: {error}", file=sys.stderr)
            return 1
        receiving = receiver.Receiver(sink, batches)
        if args.dir:
            work = receiver.receive_dir(receiving, Path(args.dir), args.idle_exit)
        elif args.mqtt:
            work = receiver.receive_mqtt(
                receiving,
                args.mqtt,
                (args.topic, args.schema_topic),
                args.share,
                tls,
                args.idle_exit,
                args.session,
            )
        else:
            campaigns = Path(args.campaigns) if args.campaigns else None
            work = receiver.receive_grpc(
                receiving, args.grpc_listen, tls, args.idle_exit, campaigns
            )
        try:
            asyncio.run(_until_terminated(work))
        except ValueError as error:  # a malformed URL
            print(f"telemetry-agent receive: {error}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            return 0  # the reader of our output went away (`| head`)
        except OSError as error:
            print(f"telemetry-agent receive: {error}", file=sys.stderr)
            return 1
        finally:
            receiving.finish()
            print(receiving.stats.summary(), file=sys.stderr)
    return 0


async def _until_terminated(work: Coroutine[Any, Any, None]) -> None:
    """Run the receiver until it returns, or until SIGTERM: a service manager's stop, which
    ends it as Ctrl-C does, with what is queued written and the sink closed (the Parquet
    lake's open files among them), rather than killing it mid-write."""
    import asyncio
    import signal

    task = asyncio.ensure_future(work)
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        if not terminated:  # a second SIGTERM must not cut the stop short
            terminated = True
            task.cancel()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        await task
    except asyncio.CancelledError:
        if not terminated:
            raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _receiver_sink(args: argparse.Namespace, out: TextIO) -> Sink:
    """The sink the options choose; each is imported only when chosen."""
    if args.postgres:
        from agent.cloud.sinks.postgres import PostgresSink

        return PostgresSink(args.postgres, args.postgres_schema)
    if args.parquet:
        from agent.cloud.sinks.parquet import ParquetSink

        return ParquetSink(
            Path(args.parquet), int(args.parquet_roll_mb * 1024 * 1024), args.parquet_roll_s
        )
    from agent.cloud.sinks.jsonl import JsonLinesSink

    return JsonLinesSink(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telemetry-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    decode = commands.add_parser(
        "decode",
        help="decode CAN logs with DBC files into JSON Lines or CSV",
        description="Decode CAN logs (candump, ASC, BLF, TRC, CSV, MF4) with DBC files.",
    )
    decode.add_argument("logs", nargs="+", metavar="LOG", help="log files, decoded in order")
    decode.add_argument(
        "--dbc",
        action="append",
        required=True,
        metavar="[BUS=]PATH",
        help="a DBC file for BUS (as the log names it), or for every bus; repeatable",
    )
    decode.add_argument(
        "--j1939",
        action="append",
        default=[],
        metavar="BUS",
        help="match this bus's extended frames by J1939 PGN; '*' for every bus; repeatable",
    )
    decode.add_argument(
        "--obd-ecus",
        action="append",
        default=[],
        type=parse_ecus_option,
        metavar="ID,ID",
        help="hear the OBD-II and UDS answers of the ECUs answering on these response IDs "
        "(0x7E8,0x7E9; 0x18DAF110 for 29-bit) to requests in the log, as records of "
        "BUS.diagnostics; repeatable",
    )
    decode.add_argument("--format", choices=[*WRITERS, "none"], default="jsonl")
    decode.add_argument("--output", metavar="PATH", help="write records here (default: stdout)")
    decode.add_argument("--choices", action="store_true", help="show choice names for values")
    decode.add_argument(
        "--log-format",
        choices=sorted(formats()),
        help="read every LOG as this format instead of guessing from its suffix",
    )
    decode.set_defaults(handler=run_decode)

    run = commands.add_parser(
        "run",
        help="run the agent",
        description="Run the agent: read the buses, decode, batch, send. Without --config it "
        "runs on its embedded defaults: simulated traffic of the demo DBC into batch files "
        "under ./state/outbox, metrics on 127.0.0.1:9108.",
    )
    run.add_argument("--config", metavar="PATH", help="the TOML config file")
    run.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    run.set_defaults(handler=run_agent)

    check = commands.add_parser(
        "check-config",
        help="validate a config file",
        description=f"Validate a config: exit 0, or print every problem and exit {EX_CONFIG}.",
    )
    check.add_argument("config", metavar="PATH")
    check.set_defaults(handler=run_check_config)

    receive = commands.add_parser(
        "receive",
        help="receive batches and write them as JSON Lines records",
        description="The reference receiver: batches from MQTT, gRPC or a folder, written as "
        'the same JSON Lines records as `decode` (plus "vehicle"), duplicates dropped.',
    )
    where = receive.add_mutually_exclusive_group(required=True)
    where.add_argument("--mqtt", metavar="URL", help="mqtt://HOST[:PORT] or mqtts://...")
    where.add_argument(
        "--grpc-listen", metavar="HOST:PORT", help="serve the Telemetry gRPC service"
    )
    where.add_argument("--dir", metavar="PATH", help="read batch files from a folder")
    receive.add_argument("--topic", default="vehicles/+/telemetry", help="MQTT topic filter")
    receive.add_argument(
        "--schema-topic",
        default="vehicles/+/schema/+",
        help="MQTT topic filter of the schema announcements (never shared)",
    )
    receive.add_argument("--share", metavar="GROUP", help="an MQTT 5 shared subscription group")
    receive.add_argument(
        "--session",
        metavar="CLIENT_ID",
        help="MQTT: a persistent session under this client id; the broker keeps what comes "
        "while the receiver is away",
    )
    receive.add_argument("--ca-file", metavar="PATH", help="TLS: the CA that signed the peer")
    receive.add_argument("--cert-file", metavar="PATH", help="TLS: this side's certificate")
    receive.add_argument("--key-file", metavar="PATH", help="TLS: this side's private key")
    receive.add_argument("--output", metavar="PATH", help="write records here (default: stdout)")
    receive.add_argument(
        "--postgres",
        metavar="URL",
        help="write into PostgreSQL instead (postgresql://USER@HOST/DB; docs/sinks.md)",
    )
    receive.add_argument(
        "--postgres-schema",
        default="telemetry",
        metavar="NAME",
        help="the PostgreSQL schema of the tables, created where missing (default telemetry)",
    )
    receive.add_argument(
        "--parquet", metavar="DIR", help="write a Parquet lake into DIR instead (docs/sinks.md)"
    )
    receive.add_argument(
        "--parquet-roll-mb",
        type=float,
        default=64,
        metavar="MB",
        help="close a partition's file once its rows take this much memory (default 64)",
    )
    receive.add_argument(
        "--parquet-roll-s",
        type=float,
        default=300,
        metavar="SECONDS",
        help="close a partition's file once it is this old (default 300)",
    )
    receive.add_argument(
        "--batches",
        metavar="PATH",
        help="write one JSON line per batch taken (stream, sequence, frames, duplicate), "
        "in arrival order",
    )
    receive.add_argument(
        "--idle-exit", type=float, metavar="SECONDS", help="stop after this long without a batch"
    )
    receive.add_argument(
        "--campaigns",
        metavar="DIR",
        help="with --grpc-listen: send the signed campaigns of this folder down the agents' "
        "control calls (docs/campaigns.md)",
    )
    receive.set_defaults(handler=run_receive)

    from agent.cloud.campaigns import add_parser as add_campaign
    from agent.cloud.health import add_parser as add_health
    from agent.cloud.snapshot import add_parser as add_snapshot

    add_campaign(commands)
    add_snapshot(commands)
    add_health(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        code: int = args.handler(args)
    except BrokenPipeError:
        # The reader of our output went away (`| head`): not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130
    return code
