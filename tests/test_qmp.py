"""The QMP client against a real QEMU (a 64 MiB TCG guest sitting in its BIOS), and the guest
agent client against a fake agent that speaks the real protocol, stale bytes included."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmo.engine.qemu import (
    DEFAULT_QMP_TIMEOUT,
    GuestAgentClient,
    MessageStream,
    QMPClient,
    QMPConnectionLost,
    QMPError,
    QMPProtocolError,
    QMPTimeout,
    Runstate,
    StateError,
    VMRunState,
    qmp_timeout,
)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, "QMP socket never appeared"
        time.sleep(0.01)
    try:
        yield proc, sock
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
async def client(qemu: tuple[subprocess.Popen[bytes], Path]) -> AsyncIterator[QMPClient]:
    async with await QMPClient.connect(qemu[1]) as connected:
        yield connected


async def test_connect_negotiates_and_reports_the_version(client: QMPClient) -> None:
    assert client.runstate is Runstate.RUNNING
    assert client.greeting["version"]["qemu"]["major"] >= 7


async def test_query_status_reports_running(client: QMPClient) -> None:
    assert await client.query_status() is VMRunState.RUNNING


async def test_stop_and_cont_change_the_run_state_and_emit_events(client: QMPClient) -> None:
    with client.listen("STOP", "RESUME") as listener:
        await client.execute("stop")
        assert (await listener.get(5))["event"] == "STOP"
        assert await client.query_status() is VMRunState.PAUSED
        await client.execute("cont")
        assert (await listener.get(5))["event"] == "RESUME"
    assert await client.query_status() is VMRunState.RUNNING


async def test_unknown_command_raises_a_typed_error_naming_the_command(client: QMPClient) -> None:
    with pytest.raises(QMPError) as caught:
        await client.execute("no-such-command", {"x": 1})
    assert caught.value.error_class == "CommandNotFound"
    assert caught.value.command == "no-such-command"
    assert caught.value.arguments == {"x": 1}
    assert "no-such-command" in caught.value.desc


async def test_bad_arguments_raise_generic_error(client: QMPClient) -> None:
    with pytest.raises(QMPError) as caught:
        await client.execute("query-status", {"bogus": True})
    assert caught.value.error_class == "GenericError"


async def test_a_silent_server_times_out_and_the_connection_survives(
    qemu: tuple[subprocess.Popen[bytes], Path], client: QMPClient
) -> None:
    os.kill(qemu[0].pid, signal.SIGSTOP)
    try:
        with pytest.raises(QMPTimeout) as caught:
            await client.execute("query-status", timeout=0.3)
        assert caught.value.command == "query-status"
        assert caught.value.timeout == 0.3
    finally:
        os.kill(qemu[0].pid, signal.SIGCONT)
    # The late reply to the timed-out command must not be taken for this one's.
    assert await client.execute("query-name") == {}


async def test_wait_event_times_out_when_nothing_happens(client: QMPClient) -> None:
    with pytest.raises(QMPTimeout):
        await client.wait_event("STOP", timeout=0.2)


async def test_wait_event_sees_an_event_triggered_after_it_started(client: QMPClient) -> None:
    waiter = asyncio.create_task(client.wait_event("STOP", timeout=5))
    await asyncio.sleep(0)  # let the waiter subscribe before the event can happen
    await client.execute("stop")
    assert (await waiter)["event"] == "STOP"


async def test_qemu_dying_is_connection_lost_for_commands_and_ends_event_streams(
    qemu: tuple[subprocess.Popen[bytes], Path], client: QMPClient
) -> None:
    events = client.events()
    next_event = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0)
    qemu[0].kill()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(next_event, 5)
    await events.aclose()
    with pytest.raises(QMPConnectionLost) as caught:
        await client.execute("query-status")
    assert caught.value.__cause__ is not None
    states = [client.runstate]
    await client.disconnect()
    states.append(client.runstate)
    assert states == [Runstate.DISCONNECTING, Runstate.IDLE]


async def test_commands_need_a_running_client() -> None:
    with pytest.raises(StateError) as caught:
        await QMPClient().execute("query-status")
    assert (caught.value.current, caught.value.required) == ("idle", "running")


async def test_connecting_twice_is_a_state_error(
    qemu: tuple[subprocess.Popen[bytes], Path], client: QMPClient
) -> None:
    with pytest.raises(StateError) as caught:
        await client.open(qemu[1])
    assert caught.value.current == "running" and caught.value.required == "idle"


async def test_connecting_to_nothing_is_connection_lost(tmp_path: Path) -> None:
    with pytest.raises(QMPConnectionLost) as caught:
        await QMPClient.connect(tmp_path / "absent.sock", timeout=1)
    assert isinstance(caught.value.__cause__, OSError)


def test_timeouts_come_from_the_table() -> None:
    assert qmp_timeout("query-status") == DEFAULT_QMP_TIMEOUT
    assert qmp_timeout("query-migrate") > DEFAULT_QMP_TIMEOUT
    assert qmp_timeout("guest-fsfreeze-freeze") >= 600
    assert qmp_timeout("migrate") > DEFAULT_QMP_TIMEOUT


async def test_logging_goes_to_named_loggers_only(
    client: QMPClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        await client.execute("query-status")
    assert caplog.records
    assert all(record.name.startswith("vmo.engine.qemu") for record in caplog.records)
    assert logging.getLogger("vmo.engine.qemu.qmp").handlers == []


def stream_of(data: bytes) -> MessageStream:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return MessageStream(reader, None)  # type: ignore[arg-type]  # read-only use


async def test_framing_splits_messages_and_skips_blank_lines() -> None:
    stream = stream_of(b'{"a": 1}\r\n\r\n{"b": 2}\n')
    assert await stream.read() == {"a": 1}
    assert await stream.read() == {"b": 2}
    with pytest.raises(QMPConnectionLost):
        await stream.read()


async def test_framing_rejects_what_is_not_a_json_object() -> None:
    with pytest.raises(QMPProtocolError) as caught:
        await stream_of(b"[1, 2]\n").read()
    assert caught.value.received == b"[1, 2]\n"
    with pytest.raises(QMPProtocolError):
        await stream_of(b"{nope\n").read()


class FakeGuestAgent:
    """A guest agent on a unix socket: stale output first, 0xFF resets, sync-delimited replies."""

    REPLIES: dict[str, Any] = {
        "guest-ping": {},
        "guest-info": {"version": "7.2.0", "supported_commands": []},
        "guest-get-osinfo": {"id": "debian", "version-id": "12", "kernel-release": "6.1.0"},
        "guest-network-get-interfaces": [{"name": "eth0", "hardware-address": "52:54:00:01:02:03"}],
        "guest-fsfreeze-freeze": 2,
        "guest-fsfreeze-thaw": 2,
    }

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # What a previous client left unread: it must never be taken for an answer.
        writer.write(b'{"return": 4242}\n{"return": {}}\n')
        while line := await reader.readline():
            text = line.lstrip(b"\xff").strip()
            if not text:
                continue
            request = json.loads(text)
            self.received.append(request)
            writer.write(self.answer(request))
            await writer.drain()
        writer.close()

    def answer(self, request: dict[str, Any]) -> bytes:
        command = request["execute"]
        if command == "guest-sync-delimited":
            return b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n"
        if command not in self.REPLIES:
            error = {
                "class": "CommandNotFound",
                "desc": f"The command {command} has not been found",
            }
            return json.dumps({"error": error}).encode() + b"\n"
        return json.dumps({"return": self.REPLIES[command]}).encode() + b"\n"


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[FakeGuestAgent, Path]]:
    fake = FakeGuestAgent()
    path = tmp_path / "qga.sock"
    server = await asyncio.start_unix_server(fake.serve, str(path))
    async with server:
        yield fake, path


async def test_guest_agent_syncs_past_stale_output_and_answers(
    agent: tuple[FakeGuestAgent, Path],
) -> None:
    fake, path = agent
    async with await GuestAgentClient.connect(path) as qga:
        await qga.ping()
        assert (await qga.info())["version"] == "7.2.0"
        assert (await qga.osinfo())["id"] == "debian"
        assert (await qga.network_interfaces())[0]["name"] == "eth0"
        assert await qga.fsfreeze_freeze() == 2
        assert await qga.fsfreeze_thaw() == 2
    assert fake.received[0]["execute"] == "guest-sync-delimited"
    assert [r["execute"] for r in fake.received[1:3]] == ["guest-ping", "guest-info"]


async def test_guest_agent_errors_are_typed(agent: tuple[FakeGuestAgent, Path]) -> None:
    async with await GuestAgentClient.connect(agent[1]) as qga:
        with pytest.raises(QMPError) as caught:
            await qga.execute("guest-exec", {"path": "/bin/true"})
    assert caught.value.error_class == "CommandNotFound"
    assert caught.value.command == "guest-exec"
