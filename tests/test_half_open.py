"""Fault 8, a half-open link: a loopback proxy between the agent and the cloud stops
forwarding without closing anything. The uplink must notice within its keepalive bound,
reconnect and send again what was not acknowledged, so the receiver still gets exactly what
`decode` gives for the log.

The acknowledgement timeout is set well past the keepalive bound, so only the keepalive
(MQTT PINGREQ/PINGRESP, HTTP/2 PING) can notice the dead link in time; and the stall is
shorter than the earliest the keepalive can notice it, so the new connection goes through.
A last test has it the other way round over gRPC: the ack timeout notices, and the agent
must then open a new connection rather than take the dead one again.
"""

from __future__ import annotations

import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path

from harness import REPO
from harness.services import ReceiverProcess, agent_command, broker, free_port
from tests.proxy import StallingProxy
from tests.test_agent_end_to_end import check_delivered, write_config

KEEPALIVE_S = 2
#: Longer than the keepalive bound: a send waiting for its ack cannot be what notices.
ACK_TIMEOUT_S = 10
#: Full within a second of the stall: then no new send is tried (and fails at once on a link
#: already dropped); what notices must also end the sends that wait for their acks.
WINDOW = 2
#: Shorter than the earliest the keepalive can notice: a ping unanswered for KEEPALIVE_S
#: (one answered before the stall resets the count).
STALL_S = 1.5
#: From the stall to the agent's next connection: the keepalive bound, twice KEEPALIVE_S
#: (MQTT: a PINGREQ after KEEPALIVE_S without a byte in, the link dropped when no PINGRESP
#: came KEEPALIVE_S later; gRPC: the same with an HTTP/2 PING), plus 1 s as paho checks once
#: a second, plus the sender's first backoff (at most 0.75 s) and slack. Below ACK_TIMEOUT_S.
RECONNECT_BOUND_S = 2 * KEEPALIVE_S + 3
#: The replays' speed: Tesla (22 s of log) takes 11 s, RAV4 (60 s) 10 s.
PACE = {"tesla": 2.0, "rav4": 6.0}
#: For the test where the ack timeout is what notices; longer than the stall, too, so the
#: new connection goes through.
SHORT_ACK_TIMEOUT_S = 2.0

assert STALL_S < KEEPALIVE_S and RECONNECT_BOUND_S < ACK_TIMEOUT_S
assert STALL_S < SHORT_ACK_TIMEOUT_S


def uplink_table(
    kind: str, url: str, keepalive_s: int = KEEPALIVE_S, ack_timeout_s: float = ACK_TIMEOUT_S
) -> str:
    return (
        f'[uplink]\nkind = "{kind}"\nurl = "{url}"\nkeepalive_s = {keepalive_s}\n'
        f"ack_timeout_s = {ack_timeout_s}\nwindow = {WINDOW}\ndrain_timeout_s = 30\n"
    )


def wait_for_records(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no records in {path} within {timeout} s")


def replay_through_a_stall(
    folder: Path,
    case: str,
    uplink: str,
    proxy: StallingProxy,
    receiver: ReceiverProcess,
    bound_s: float = RECONNECT_BOUND_S,
) -> None:
    """Runs the agent, stalls the proxy for STALL_S once batches flow, and checks that the
    agent connected again within `bound_s` of the stall and that every record came. The
    batches sent into the black hole come only if they are sent again."""
    config = write_config(folder, case, uplink, pace=PACE[case])
    stderr_path = folder / "agent.stderr"
    with open(stderr_path, "w") as stderr:
        agent = subprocess.Popen(
            agent_command("run", "--config", config), stderr=stderr, cwd=REPO, text=True
        )
    try:
        wait_for_records(receiver.output)
        time.sleep(1.0)  # mid-stream: several batches a second go out
        assert len(proxy.accepted) == 1
        stalled_at = time.monotonic()
        proxy.stall()
        time.sleep(STALL_S)
        proxy.resume()
        reconnected_at = proxy.wait_for_connections(2, stalled_at + 30 - time.monotonic())
        agent.wait(60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    receiver.interrupt_once_quiet()
    result = subprocess.CompletedProcess(agent.args, agent.returncode, "", stderr_path.read_text())
    assert reconnected_at is not None, "the agent never reconnected"
    took = reconnected_at - stalled_at
    print(f"{case}: from the stall to the next connection: {took:.2f} s")
    print("\n".join(line for line in result.stderr.splitlines() if "retrying" in line))
    assert took <= bound_s, f"{took:.2f} s: {result.stderr}"
    assert "retrying" in result.stderr  # it gave the old link up
    check_delivered(folder, case, receiver, result)


def stop(receiver: ReceiverProcess) -> None:
    """After a failure: the receiver must not outlive the test."""
    if receiver.process.poll() is None:
        receiver.process.kill()
        receiver.process.wait(10)


def test_mqtt_notices_a_half_open_link_and_sends_again(tmp_path: Path) -> None:
    with broker(tmp_path) as mqtt, StallingProxy(mqtt.port) as proxy:
        receiver = ReceiverProcess(tmp_path / "received.jsonl", "--mqtt", mqtt.url)
        try:
            receiver.wait_ready("subscribed to")
            uplink = uplink_table("mqtt", f"mqtt://127.0.0.1:{proxy.port}")
            replay_through_a_stall(tmp_path, "tesla", uplink, proxy, receiver)
        finally:
            stop(receiver)


def grpc_through_a_stall(
    folder: Path,
    keepalive_s: int = KEEPALIVE_S,
    ack_timeout_s: float = ACK_TIMEOUT_S,
    bound_s: float = RECONNECT_BOUND_S,
) -> None:
    port = free_port()
    receiver = ReceiverProcess(folder / "received.jsonl", "--grpc-listen", f"127.0.0.1:{port}")
    try:
        receiver.wait_ready("listening for gRPC")
        with StallingProxy(port) as proxy:
            url = f"127.0.0.1:{proxy.port}"
            uplink = uplink_table("grpc", url, keepalive_s, ack_timeout_s)
            replay_through_a_stall(folder, "rav4", uplink, proxy, receiver, bound_s)
    finally:
        stop(receiver)


def test_grpc_notices_a_half_open_link_and_sends_again(tmp_path: Path) -> None:
    grpc_through_a_stall(tmp_path)


def test_grpc_after_an_ack_timeout_connects_anew(tmp_path: Path) -> None:
    """A keepalive too long to matter: the ack timeout notices. The new channel must open
    its own connection; from grpcio's shared subchannel pool it would get the dead one
    again, ready at once, and time out on it over and over."""
    # The bound: the ack timeout, the sender's first backoff (at most 0.75 s), and slack.
    grpc_through_a_stall(
        tmp_path, keepalive_s=60, ack_timeout_s=SHORT_ACK_TIMEOUT_S, bound_s=SHORT_ACK_TIMEOUT_S + 2
    )


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


def _answer(link: socket.socket, data: bytes) -> bytes | None:
    """What comes back for `data` (echoed), or None when nothing comes within the timeout."""
    link.sendall(data)
    got = b""
    try:
        while len(got) < len(data) and (chunk := link.recv(len(data) - len(got))):
            got += chunk
    except TimeoutError:
        return got or None
    return got


def test_the_proxy_forwards_black_holes_and_resumes() -> None:
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    echo.daemon_threads = True
    serving = threading.Thread(target=echo.serve_forever)
    serving.start()
    try:
        with StallingProxy(echo.server_address[1]) as proxy:

            def connect() -> socket.socket:
                link = socket.create_connection(("127.0.0.1", proxy.port), 2)
                link.settimeout(0.5)
                return link

            with connect() as old:
                assert _answer(old, b"ping") == b"ping"
                proxy.stall()
                assert _answer(old, b"lost") is None
                with connect() as during:
                    assert _answer(during, b"lost") is None
                    proxy.resume()
                    with connect() as new:
                        assert _answer(new, b"back") == b"back"
                    assert _answer(during, b"still") is None
                assert _answer(old, b"still") is None
            assert len(proxy.accepted) == 3
            assert proxy.wait_for_connections(4, 0.1) is None
        assert not [t for t in threading.enumerate() if t.name.startswith("stalling-proxy")]
    finally:
        echo.shutdown()
        echo.server_close()
        serving.join(5)
