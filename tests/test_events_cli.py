"""``vmo events VM``: the Events of the VM, its VMI and its virt-launcher Pods (and no other
object's), oldest first by lastTimestamp, eventTime or firstTimestamp; ``--watch`` prints new
ones as they are recorded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmo.cli.events import EventFilter, event_time
from vmo.cli.main import main
from vmo.client import EVENT, Client
from vmo.testing.apiserver import ThreadedServer

NS = "virtual-machines"
JSON = dict[str, Any]


def event(name: str, kind: str, target: str, reason: str, *, last: str, **extra: Any) -> JSON:
    return {
        "metadata": {"name": name, "namespace": NS},
        "involvedObject": {"kind": kind, "name": target, "namespace": NS},
        "reason": reason,
        "message": f"{reason} of {kind} {target}",
        "type": "Normal",
        "source": {"component": "test"},
        "count": 1,
        "firstTimestamp": last,
        "lastTimestamp": last,
        **extra,
    }


EVENTS = [
    event("e-started", "VirtualMachineInstance", "db", "Started", last="2026-01-01T10:00:03Z"),
    event("e-created", "VirtualMachine", "db", "SuccessfulCreate", last="2026-01-01T10:00:01Z"),
    event("e-pod", "Pod", "virt-launcher-db-bcdfg", "Scheduled", last="2026-01-01T10:00:02Z"),
    event("e-other-vm", "VirtualMachine", "db-2", "SuccessfulCreate",
          last="2026-01-01T10:00:00Z"),
    event("e-other-pod", "Pod", "virt-launcher-db-2-bcdfg", "Scheduled",
          last="2026-01-01T10:00:00Z"),
    event("e-migrated", "VirtualMachineInstance", "db", "Migrated", last="2026-01-01T10:00:05Z",
          count=3, type="Warning"),
]  # fmt: skip


async def _record(server: ThreadedServer, events: list[JSON]) -> None:
    async with Client.from_kubeconfig(server.kubeconfig) as client:
        for obj in events:
            await client.create(EVENT, obj)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with ThreadedServer(home=tmp_path_factory.mktemp("events-home")) as api:
        asyncio.run(_record(api, EVENTS))
        yield api


def vmo(server: ThreadedServer, *argv: str) -> list[str]:
    return ["--home", str(server.home), "events", *argv, "-n", NS,
            "--kubeconfig", str(server.kubeconfig)]  # fmt: skip


def test_the_filter_takes_the_vm_its_vmi_and_its_pods_only() -> None:
    wanted = EventFilter("db")
    assert [e["metadata"]["name"] for e in EVENTS if wanted(e)] == [
        "e-started", "e-created", "e-pod", "e-migrated",
    ]  # fmt: skip


def test_event_time_prefers_last_then_event_then_first() -> None:
    assert event_time({"eventTime": "2026-01-01T00:00:02.000000Z"}).second == 2
    assert event_time({"firstTimestamp": "2026-01-01T00:00:03Z"}).second == 3
    stamp = event_time(
        {"lastTimestamp": "2026-01-01T00:00:04Z", "eventTime": "2026-01-01T00:00:01Z"}
    )
    assert stamp.second == 4


def test_events_are_listed_oldest_first(
    server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(vmo(server, "db")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["LAST", "SEEN", "TYPE", "REASON"]
    reasons = [line.split()[2] for line in lines[1:]]
    assert reasons == ["SuccessfulCreate", "Scheduled", "Started", "Migrated"]
    assert "VirtualMachineInstance/db" in lines[4] and "(x3)" in lines[4]
    assert "Warning" in lines[4]
    assert not any("db-2" in line for line in lines)


def test_a_vm_without_events_says_so(
    server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(vmo(server, "vm/nothing-here")) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "No events found for VM nothing-here" in captured.err


def test_watch_prints_new_events_as_they_come(server: ThreadedServer) -> None:
    argv = [sys.executable, "-m", "vmo.cli.main", *vmo(server, "db", "--watch")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen = [proc.stdout.readline() for _ in range(5)]  # the header and four Events
        assert "Migrated" in seen[-1]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        asyncio.run(_record(server, [
            event("e-unrelated", "VirtualMachine", "other", "Stopped", last=now),
            event("e-stopped", "VirtualMachine", "db", "Stopped", last=now),
        ]))  # fmt: skip
        line = proc.stdout.readline()
        assert "Stopped" in line and "VirtualMachine/db" in line
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def test_an_unreachable_server_fails_in_one_line(server: ThreadedServer, tmp_path: Any) -> None:
    kubeconfig = tmp_path / "gone.kubeconfig"
    kubeconfig.write_text(server.kubeconfig.read_text().replace(server.url, "https://127.0.0.1:1"))
    done = subprocess.run(
        [sys.executable, "-m", "vmo.cli.main", "events", "db", "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot reach the API server" in done.stderr
