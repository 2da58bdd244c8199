"""Monitoring end to end: real guests, the real Prometheus, the endpoints VMO serves.

Two node agents of an embedded engine, VMO's controllers as their own process, and Debian's
Prometheus started as ``vmo up`` starts it (TLS, basic auth, a token of its own, VMO's rules),
scraping every 2 s. One guest with a data disk and a bridge interface:
- burning CPU in the guest raises ``kubevirt_vmi_cpu_usage_seconds_total`` at about one core;
- writing 64 MiB to its data disk raises the drive's write bytes by 64 MiB, within 10 %;
- a live migration shows in the migration metrics and the outcome gauge;
- a separately run node agent killed with SIGKILL fires VMONodeAgentDown within the rule's
  ``for`` (and scrape and evaluation intervals), and restarting it resolves the alert;
- every dashboard query parses and returns series;
- every endpoint refuses anonymous and unauthorized scrapes.
The tests run in order and share the guest.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Api, Kubectl, make_user
from tests.test_migration_e2e import migrate, node_of, wait_phase
from tests.test_snapshot_e2e import DATA_SERIAL, blank_dv
from tests.test_vm_e2e import BOOT_TIMEOUT, NS, console, engine_cluster, vm, wait_for, wait_running
from vmo.cli import monitoring
from vmo.home import StateDir
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import http_datavolume

SCRAPE = 2.0
KILLED_NODE = "node-mon"
NODE_AGENT_DOWN_FOR = 60.0
POLICIES = "/apis/migrations.kubevirt.io/v1alpha1/migrationpolicies"
MIB = 1024 * 1024
JSON = dict[str, Any]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prom:
    """Prometheus's HTTP API as ``vmo top`` reaches it: TLS to VMO's CA, basic auth."""

    def __init__(self, access: JSON) -> None:
        self.url = access["url"]
        self.session = requests.Session()
        self.session.auth = (access["username"], access["password"])
        self.session.verify = access["ca_file"]
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify

    def query(self, expr: str) -> list[JSON]:
        r = self.session.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body.get("status") == "success", (expr, body)
        result: list[JSON] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def targets(self) -> list[JSON]:
        r = self.session.get(f"{self.url}/api/v1/targets", timeout=10)
        active: list[JSON] = r.json()["data"]["activeTargets"]
        return active

    def range(self, expr: str, seconds: float) -> list[JSON]:
        """The series ``expr`` had over the last ``seconds``, as a dashboard panel draws it."""
        now = time.time()
        params = {"query": expr, "start": now - seconds, "end": now, "step": SCRAPE}
        r = self.session.get(f"{self.url}/api/v1/query_range", params=params, timeout=30)
        body = r.json()
        assert body.get("status") == "success", (expr, body)
        result: list[JSON] = body["data"]["result"]
        return result

    def alerts(self) -> list[JSON]:
        r = self.session.get(f"{self.url}/api/v1/alerts", timeout=10)
        alerts: list[JSON] = r.json()["data"]["alerts"]
        return alerts


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-mon"), nodes=2)


@pytest.fixture(scope="module")
def controllers(cluster: ThreadedServer) -> Iterator[None]:
    """VMO's controllers as ``vmo up`` runs them: their own process, announcing /metrics."""
    argv = [sys.executable, "-m", "vmo.cli.main", "--home", str(cluster.home),
            "controllers", "run", "--kubeconfig", str(cluster.kubeconfig),
            "--backup-root", str(cluster.home / "backups"), "--lease-duration", "4",
            "--metrics-announce"]  # fmt: skip
    log = (cluster.home / "controllers.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def prom(cluster: ThreadedServer, controllers: None) -> Iterator[Prom]:
    """Prometheus as ``vmo up`` starts it, on the server's event loop, scraping every 2 s."""
    state = StateDir(cluster.home)
    settings = monitoring.Settings(listen=f"127.0.0.1:{_free_port()}", scrape_interval="2s")
    stop = cluster.call(_event())
    address = cluster.url.removeprefix("https://")
    running: Future[None] = asyncio.run_coroutine_threadsafe(
        monitoring.supervise(state, address, settings, stop), cluster._loop
    )
    access_file = state.monitoring / "prometheus.json"
    wait_for(access_file.exists, 60, "prometheus.json")
    client = Prom(json.loads(access_file.read_text()))

    def all_up() -> bool:
        jobs = {(t["labels"]["job"], t["health"]) for t in client.targets()}
        wanted = {("vmo-apiserver", "up"), ("vmo-node-agent", "up"), ("vmo-controllers", "up")}
        return wanted <= jobs

    wait_for(all_up, 60, "every job scraped")
    try:
        yield client
    finally:
        cluster._loop.call_soon_threadsafe(stop.set)
        running.result(30)


async def _event() -> asyncio.Event:
    return asyncio.Event()


@pytest.fixture(scope="module")
def guest(k: Kubectl, capi: Api, cluster: ThreadedServer, image_server: str, prom: Prom) -> str:
    """VM ``mon``: a root disk, a 128 MiB data disk, the pod network and a bridge network."""
    k.apply(
        {
            "apiVersion": "k8s.cni.cncf.io/v1",
            "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": "mon-net", "namespace": NS},
            "spec": {"config": '{"cniVersion":"0.3.1","type":"bridge","bridge":"vmo-mon"}'},
        }
    )
    k.apply(http_datavolume("mon-root", f"{image_server}/disk.qcow2", namespace=NS))
    k.apply(blank_dv("mon-data", "128Mi"))
    manifest = vm(
        "mon", disk="mon-root", labels={"mon-test": "slow"}, nets=[{"name": "l2", "nad": "mon-net"}]
    )
    spec = manifest["spec"]["template"]["spec"]
    spec["domain"]["devices"]["disks"].append(
        {"name": "data", "disk": {"bus": "virtio"}, "serial": DATA_SERIAL}
    )
    spec["volumes"].append({"name": "data", "dataVolume": {"name": "mon-data"}})
    k.apply(manifest)
    wait_running(capi, "mon")
    wait_for(lambda: "mon-up" in console(cluster, "mon", "echo mon-up"), BOOT_TIMEOUT, "console")
    return "mon"


def _series(prom: Prom, expr: str, timeout: float = 30) -> list[JSON]:
    result: list[JSON] = wait_for(lambda: prom.query(expr), timeout, expr)
    return result


def test_a_guest_burning_cpu_uses_about_one_core(
    cluster: ThreadedServer, prom: Prom, guest: str
) -> None:
    expr = f'rate(kubevirt_vmi_cpu_usage_seconds_total{{name="{guest}"}}[20s])'
    console(cluster, guest, "(timeout 40 sh -c 'while :; do :; done' &) ; echo burning")
    time.sleep(26)
    rate = prom.value(expr)
    console(cluster, guest, "killall timeout sh 2>/dev/null; echo stopped")
    assert rate is not None, "no CPU series for the guest"
    assert 0.7 <= rate <= 1.35, f"a guest burning one vCPU used {rate:.2f} cores"
    vcpus = prom.query(f'kubevirt_vmi_vcpu_seconds_total{{name="{guest}"}}')
    assert {s["metric"]["id"] for s in vcpus} == {"0"}
    assert all(s["metric"]["state"] == "running" for s in vcpus)


def test_writing_64_mib_raises_the_drives_write_bytes_by_that_much(
    cluster: ThreadedServer, prom: Prom, guest: str
) -> None:
    expr = f'kubevirt_vmi_storage_write_traffic_bytes_total{{name="{guest}",drive="data"}}'
    _series(prom, expr)
    time.sleep(2 * SCRAPE)
    before = prom.value(expr)
    find = (
        f'for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = {DATA_SERIAL} ] && '
        "D=/dev/${d##*/}; done"
    )
    out = console(
        cluster, guest, f"{find}; dd if=/dev/zero of=$D bs=1M count=64 oflag=direct; echo wrote"
    )
    assert "wrote" in out
    time.sleep(3 * SCRAPE)
    after = prom.value(expr)
    assert before is not None and after is not None
    written = after - before
    assert abs(written - 64 * MIB) <= 0.1 * 64 * MIB, f"write bytes rose {written / MIB:.1f} MiB"
    iops = prom.value(f'kubevirt_vmi_storage_iops_write_total{{name="{guest}",drive="data"}}')
    assert iops is not None and iops >= 64
    nics = prom.query(f'kubevirt_vmi_network_transmit_packets_total{{name="{guest}"}}')
    assert {s["metric"]["interface"] for s in nics} == {"l2"}
    node = prom.query(f'vmo_node_storage_write_traffic_bytes_total{{node="{_node(prom, guest)}"}}')
    assert node and float(node[0]["value"][1]) >= after


def _node(prom: Prom, guest: str) -> str:
    found = _series(prom, f'kubevirt_vmi_memory_resident_bytes{{name="{guest}"}}')
    return str(found[0]["metric"]["node"])


@pytest.fixture(scope="module")
def slow_migrations(capi: Api) -> Iterator[None]:
    """The guest migrates at 8 MiB/s: long enough for several scrapes to see it in flight."""
    policy = {
        "apiVersion": "migrations.kubevirt.io/v1alpha1",
        "kind": "MigrationPolicy",
        "metadata": {"name": "mon-slow"},
        "spec": {
            "selectors": {"virtualMachineInstanceSelector": {"mon-test": "slow"}},
            "bandwidthPerMigration": "8Mi",
        },
    }
    assert capi.post(POLICIES, policy).status_code == 201
    yield
    capi.delete(f"{POLICIES}/mon-slow")


def test_a_migration_shows_in_the_migration_metrics(
    capi: Api, prom: Prom, guest: str, slow_migrations: None
) -> None:
    source = node_of(capi, guest)
    mig = migrate(capi, guest)
    done = wait_phase(capi, mig["metadata"]["name"], "Succeeded", "Failed", timeout=300)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert node_of(capi, guest) != source
    processed = prom.value(
        f'max_over_time(kubevirt_vmi_migration_data_processed_bytes{{name="{guest}"}}[10m])'
    )
    assert processed is not None and processed > 0, "no scrape saw the migration in flight"
    total = prom.value(
        f'max_over_time(kubevirt_vmi_migration_data_bytes_total{{name="{guest}"}}[10m])'
    )
    assert total is not None and total >= processed
    succeeded = wait_for(
        lambda: prom.value(f'kubevirt_vmi_migration_succeeded{{vmi="{guest}"}}'), 30, "outcome"
    )
    assert succeeded >= 1
    # the guest's series now come from the target node alone (the source's go stale)
    target = node_of(capi, guest)
    expr = f'kubevirt_vmi_memory_resident_bytes{{name="{guest}"}}'
    wait_for(lambda: {s["metric"]["node"] for s in prom.query(expr)} == {target}, 30, target)


def _firing(prom: Prom, alertname: str, node: str) -> bool:
    return any(
        a["labels"].get("alertname") == alertname
        and a["labels"].get("node") == node
        and a["state"] == "firing"
        for a in prom.alerts()
    )


def _node_run(cluster: ThreadedServer, name: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "vmo.cli.main", "--home", str(cluster.home), "node", "run",
            "--name", name]  # fmt: skip
    with (cluster.home / f"{name}.log").open("ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def test_a_killed_node_agent_fires_its_alert_and_a_restart_resolves_it(
    cluster: ThreadedServer, prom: Prom
) -> None:
    name = KILLED_NODE
    proc = _node_run(cluster, name)
    try:
        up = f'up{{job="vmo-node-agent",node="{name}"}}'
        wait_for(lambda: prom.value(up) == 1, 90, f"{name} scraped")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        limit = NODE_AGENT_DOWN_FOR + 4 * SCRAPE + 10
        wait_for(lambda: _firing(prom, "VMONodeAgentDown", name), limit, "VMONodeAgentDown")
        took = time.monotonic() - killed
        assert took >= NODE_AGENT_DOWN_FOR - SCRAPE, f"fired after {took:.0f}s, before its for"
        proc = _node_run(cluster, name)
        wait_for(lambda: not _firing(prom, "VMONodeAgentDown", name), 60, "the alert resolved")
        assert prom.value(up) == 1
    finally:
        _stop(proc)


SNAP = f"/apis/snapshot.kubevirt.io/v1beta1/namespaces/{NS}/virtualmachinesnapshots"
CLONE = f"/apis/clone.kubevirt.io/v1beta1/namespaces/{NS}/virtualmachineclones"
BACKUP_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "backup-policy.yaml"


def _phase(capi: Api, path: str) -> str:
    return str((capi.get(path).json().get("status") or {}).get("phase", ""))


def test_snapshots_clones_and_backups_show_in_their_metrics(
    capi: Api, k: Kubectl, prom: Prom, guest: str
) -> None:
    k.apply(
        {
            "apiVersion": "snapshot.kubevirt.io/v1beta1",
            "kind": "VirtualMachineSnapshot",
            "metadata": {"name": "mon-snap", "namespace": NS},
            "spec": {
                "source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": guest}
            },
        }
    )
    wait_for(lambda: _phase(capi, f"{SNAP}/mon-snap") == "Succeeded", 120, "the snapshot")
    k.apply(
        {
            "apiVersion": "clone.kubevirt.io/v1beta1",
            "kind": "VirtualMachineClone",
            "metadata": {"name": "mon-clone", "namespace": NS},
            "spec": {
                "source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": guest},
                "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "mon-copy"},
            },
        }
    )
    wait_for(lambda: _phase(capi, f"{CLONE}/mon-clone") == "Succeeded", 180, "the clone")
    k("delete", "vm", "mon-copy", "-n", NS, "--wait=false")
    k("apply", "-f", str(BACKUP_EXAMPLE))
    k("annotate", "backuppolicy", "nightly", "-n", NS, "vmo.dev/backup-now=yes", "--overwrite")
    policy = f"/apis/vmo.dev/v1alpha1/namespaces/{NS}/backuppolicies/nightly"

    def backed_up() -> bool:
        vms = (capi.get(policy).json().get("status") or {}).get("virtualMachines") or []
        return any(v.get("name") == guest and v.get("recoveryPoint") for v in vms)

    wait_for(backed_up, 240, "the policy's backup of the guest")
    snapshots = wait_for(
        lambda: prom.value(f'vmo_snapshots{{namespace="{NS}",phase="Succeeded"}}'), 30, "snapshots"
    )
    assert snapshots >= 1
    timed = wait_for(
        lambda: prom.value(
            f'sum(vmo_snapshot_duration_seconds_count{{namespace="{NS}",result="succeeded"}})'
        ),
        30,
        "the snapshot's duration",
    )
    assert timed >= 1
    clones = wait_for(
        lambda: prom.value(f'sum(vmo_clone_duration_seconds_count{{namespace="{NS}"}})'),
        30,
        "the clone's duration",
    )
    assert clones >= 1
    point = wait_for(
        lambda: prom.value(
            f'vmo_backup_recovery_point_timestamp_seconds{{namespace="{NS}",vm="{guest}"}}'
        ),
        30,
        "the recovery point",
    )
    assert abs(time.time() - point) < 600
    objective = prom.value('vmo_backup_recovery_point_objective_seconds{policy="nightly"}')
    assert objective == 2 * 86400  # twice the daily schedule's interval
    # the run, timed from the policy's record; a rate needs two scrapes of it
    runs = wait_for(
        lambda: prom.value(
            f'sum(vmo_backup_duration_seconds_count{{namespace="{NS}",result="succeeded"}})'
        ),
        60,
        "the backup's duration",
    )
    assert runs >= 1
    wait_for(
        lambda: prom.range(f'rate(vmo_backup_duration_seconds_count{{namespace="{NS}"}}[1m])', 60),
        60,
        "a rate of backups",
    )


def test_every_dashboard_query_parses_and_returns_series(prom: Prom, guest: str) -> None:
    """Every panel of every dashboard draws something over the module's run (the migration's
    and the backup's panels included: the tests before made them happen)."""
    from vmo.testing.dashboards import dashboard_queries

    values = {"node": ".+", "namespace": NS, "vm": guest, "vmi": guest, "policy": ".+"}
    empty = []
    for dashboard, title, expr in dashboard_queries(values):
        if not prom.range(expr, 20 * 60):
            empty.append(f"{dashboard} / {title}: {expr}")
    assert not empty, "queries without series:\n" + "\n".join(empty)


def _endpoints(prom: Prom) -> list[str]:
    """Every endpoint Prometheus scrapes successfully (a stopped agent's target stays, down)."""
    return sorted(
        t["scrapeUrl"]
        for t in prom.targets()
        if t["health"] == "up" and t["labels"].get("node") != KILLED_NODE
    )


def test_metrics_endpoints_refuse_anonymous_and_unauthorized_scrapes(
    cluster: ThreadedServer, prom: Prom
) -> None:
    token, _ = make_user(cluster, "mon-nobody")
    ca = str(cluster.ca)
    urls = _endpoints(prom)
    assert len(urls) >= 4, urls  # the API server, two node agents, the controllers
    allowed = (StateDir(cluster.home).monitoring / "token").read_text().strip()
    for url in urls:
        assert requests.get(url, verify=ca, timeout=10).status_code == 401, url
        bad = {"Authorization": "Bearer not-a-token"}
        assert requests.get(url, verify=ca, headers=bad, timeout=10).status_code == 401, url
        nobody = {"Authorization": f"Bearer {token}"}
        r = requests.get(url, verify=ca, headers=nobody, timeout=10)
        assert r.status_code == 403, (url, r.status_code, r.text)
        assert r.json()["kind"] == "Status"
        ok = requests.get(
            url, verify=ca, headers={"Authorization": f"Bearer {allowed}"}, timeout=10
        )
        assert ok.status_code == 200, url
        assert ok.headers["Content-Type"].startswith("text/plain")


def test_no_label_holds_a_uid_or_a_timestamp(cluster: ThreadedServer, prom: Prom) -> None:
    import re

    uid = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    stamp = re.compile(r"^\d{4}-\d{2}-\d{2}T|^1[6-9]\d{8}(\.\d+)?$")
    names = prom.session.get(f"{prom.url}/api/v1/label/__name__/values", timeout=10).json()
    ours = [n for n in names["data"] if n.startswith(("kubevirt_", "vmo_"))]
    assert len(ours) > 40, ours
    bad = []
    for series in prom.query('{__name__=~"kubevirt_.*|vmo_.*"}'):
        for label, value in series["metric"].items():
            if uid.match(value) or stamp.match(value):
                bad.append(f"{series['metric']['__name__']}{{{label}={value!r}}}")
    assert not bad, bad
