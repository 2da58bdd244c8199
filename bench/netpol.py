"""Benchmark: what network policy costs, and how soon a change holds, on a VLAN bridge network
(MultiNetworkPolicy) and on the pod network (NetworkPolicy).

A one-node embedded cluster runs four test guests: a server and a client on one VLAN (a bridge
NAD with host-local IPAM), and a server and a client on the pod network, the server behind a
ClusterIP Service. Each server guest serves 32 MiB from /dev/zero on TCP 5001 to each
connection; its client reads it (``time nc SERVER 5001 > /dev/null`` on its serial console;
busybox's ``time`` gives the seconds). Three cases per network, each the median of several
transfers, measured in interleaved rounds (one transfer per case, the order rotating):

- no policy engine: no policy, so the node has no table and the forwarders ask nothing;
- 1 rule: the server isolated, with one rule letting the client in (on the pod network also
  the client isolated for egress, with one rule letting it reach the server);
- 500 rules: the same policies after 499 rules that do not match (ipBlocks elsewhere).

Printed: MB/s per case, and its throughput beside the same round's no-policy transfer (the
median of those ratios, and their spread); the 500-rule case's loss beside the 5 % target.
Then the time from creating (and deleting) a 500-rule policy through the API to the node's
nftables table holding (and no longer holding) the VM's chain, polled every 10 ms, beside the
1 s target.
Under TCG the guests' CPU bounds the transfers; the figures say what the rules add to that
path, not what the hardware could do.

    .venv/bin/python bench/netpol.py [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from vmo.client import (
    DATAVOLUME,
    MULTI_NETWORK_POLICY,
    NAD,
    NETWORK_POLICY,
    SERVICE,
    VM,
    VMI,
    Client,
    NotFound,
)
from vmo.engine.network.l2policy import table_name
from vmo.engine.network.podpolicy import pod_table_name
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import boot_vm, http_datavolume
from vmo.testing.console import console_exchange
from vmo.testing.guest import build_guest, default_cache_dir
from vmo.testing.processes import kill_qemus_under

NS = "virtual-machines"
NODE = "node-1"
MIB = 2**20
SIZE_MIB = 32
TARGET_LOSS = 0.05
TARGET_ENFORCE_S = 1.0
POLICY_FOR = "k8s.v1.cni.cncf.io/policy-for"


def nad() -> dict[str, Any]:
    config = {
        "cniVersion": "0.3.1",
        "name": "bench40",
        "type": "bridge",
        "bridge": "br-vmo-bench",
        "vlan": 40,
        "ipam": {"type": "host-local", "subnet": "192.168.40.0/24"},
    }
    return {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "bench40", "namespace": NS},
        "spec": {"config": json.dumps(config)},
    }


def guest_vm(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return boot_vm(
        name,
        namespace=NS,
        disk=f"{name}-root",
        interfaces=[{"name": "lan", "bridge": {}}],
        networks=[{"name": "lan", "multus": {"networkName": "bench40"}}],
        labels=labels,
        cloud_init={"userData": "#cloud-config\n"},
    )


def policy(extra_rules: int) -> dict[str, Any]:
    misses = [
        {
            "from": [{"ipBlock": {"cidr": f"10.{i // 250}.{i % 250}.0/24"}}],
            "ports": [{"port": 5001}],
        }
        for i in range(extra_rules)
    ]
    allow = {
        "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
        "ports": [{"port": 5001}],
    }
    return {
        "apiVersion": "k8s.cni.cncf.io/v1beta1",
        "kind": "MultiNetworkPolicy",
        "metadata": {"name": "bench", "namespace": NS, "annotations": {POLICY_FOR: "bench40"}},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [*misses, allow]},
    }


def pod_vm(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return boot_vm(
        name,
        namespace=NS,
        disk=f"{name}-root",
        interfaces=[{"name": "default", "masquerade": {}}],
        networks=[{"name": "default", "pod": {}}],
        labels=labels,
        cloud_init={"userData": "#cloud-config\n"},
    )


def service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "pserver", "namespace": NS},
        "spec": {
            "selector": {"app": "pserver"},
            "ports": [{"name": "data", "port": 5001, "targetPort": 5001}],
        },
    }


def pod_policies(extra_rules: int) -> list[dict[str, Any]]:
    """The pod server isolated for ingress, the pod client for egress, each with
    ``extra_rules`` rules that do not match before the one that lets the transfer through."""

    def misses(peers: str) -> list[dict[str, Any]]:
        return [
            {
                peers: [{"ipBlock": {"cidr": f"10.{i // 250}.{i % 250}.0/24"}}],
                "ports": [{"port": 5001}],
            }
            for i in range(extra_rules)
        ]

    def netpol(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": NS},
            "spec": spec,
        }

    ingress = {"from": [{"podSelector": {"matchLabels": {"role": "pclient"}}}],
               "ports": [{"port": 5001}]}  # fmt: skip
    egress = {"to": [{"podSelector": {"matchLabels": {"app": "pserver"}}}],
              "ports": [{"port": 5001}]}  # fmt: skip
    return [
        netpol(
            "bench-in",
            {
                "podSelector": {"matchLabels": {"app": "pserver"}},
                "ingress": [*misses("from"), ingress],
            },
        ),
        netpol(
            "bench-out",
            {
                "podSelector": {"matchLabels": {"role": "pclient"}},
                "policyTypes": ["Egress"],
                "egress": [*misses("to"), egress],
            },
        ),
    ]


async def wait_running(client: Client, name: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(NotFound):
            vmi = await client.get(VMI, name, NS)
            if (vmi.get("status") or {}).get("phase") == "Running":
                return vmi
        await asyncio.sleep(1)
    raise TimeoutError(f"VMI {name} not Running in {timeout:g} s")


async def shell(server: ThreadedServer, vmi: str, command: str, timeout: float = 120) -> str:
    return await console_exchange(server, NS, vmi, command, timeout)


async def ready(server: ThreadedServer, vmi: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, OSError):
            if "ready" in await shell(server, vmi, "echo ready", timeout=10):
                return
        await asyncio.sleep(2)
    raise TimeoutError(f"{vmi}'s console never answered")


_REAL = re.compile(r"real\s+(?:(\d+)m\s*)?([\d.]+)s")


async def transfer(server: ThreadedServer, server_ip: str, client: str = "client") -> float:
    """MB/s of one 32 MiB transfer from a server guest to ``client``; the client counts the
    bytes, and a short transfer is an error, not a figure."""
    out = await shell(server, client, f"time nc {server_ip} 5001 | wc -c")
    found = _REAL.search(out)
    counted = [int(line) for line in out.split() if line.isdigit()]
    if found is None or SIZE_MIB * MIB not in counted:
        raise RuntimeError(f"no whole transfer in the guest's answer: {out!r}")
    seconds = int(found.group(1) or 0) * 60 + float(found.group(2))
    return SIZE_MIB * MIB / max(seconds, 1e-3) / 1e6


async def case(server: ThreadedServer, ip: str, repeats: int, client: str = "client") -> float:
    for attempt in range(15):  # warm-up, once the server's listener is up (TCG is slow)
        try:
            await transfer(server, ip, client)
            break
        except RuntimeError as exc:
            if attempt == 14:
                seen = {
                    name: await shell(server, name, "ip -4 -o addr; netstat -tln 2>&1 | head")
                    for name in (client, "server" if client == "client" else "pserver")
                }
                raise RuntimeError(f"{exc}; what the guests say: {seen!r}") from None
            await asyncio.sleep(2)
    if not repeats:
        return 0.0
    return statistics.median([await transfer(server, ip, client) for _ in range(repeats)])


def _listed(table: str) -> str:
    listed = subprocess.run(
        ["nft", "list", "table", "inet", table], capture_output=True, text=True, check=False
    )
    return listed.stdout


def holds(mac: str) -> bool:
    return mac in _listed(table_name(NODE))


def pod_holds() -> bool:
    """The pod client's egress chain is in the node's pod-network table."""
    return f"vmo/{NODE}/{NS}/pclient" in _listed(pod_table_name(NODE))


async def until(predicate: Any, timeout: float = 30) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("the table never changed")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def run(server: ThreadedServer, repeats: int) -> None:
    async with Client.from_kubeconfig(server.kubeconfig) as client:
        await client.create(NAD, nad(), NS)
        url = f"file://{server.home / 'images' / 'disk.qcow2'}"
        guests = (
            ("server", {"app": "server"}, guest_vm),
            ("client", {"role": "client"}, guest_vm),
            ("pserver", {"app": "pserver"}, pod_vm),
            ("pclient", {"role": "pclient"}, pod_vm),
        )
        for name, labels, make in guests:
            await client.create(DATAVOLUME, http_datavolume(f"{name}-root", url, namespace=NS), NS)
            await client.create(VM, make(name, labels), NS)
        svc = await client.create(SERVICE, service(), NS)
        cluster_ip = str(svc["spec"]["clusterIP"])
        vmi = await wait_running(client, "server")
        for name, _, _ in guests:
            await wait_running(client, name)
            await ready(server, name)
        lan = next(i for i in vmi["status"]["interfaces"] if i["name"] == "lan")
        ip, mac = str(lan["ipAddress"]), str(lan["mac"]).lower()
        count = SIZE_MIB * MIB // 65536
        for name in ("server", "pserver"):
            await shell(
                server,
                name,
                f'nc -ll -p 5001 -e sh -c "dd if=/dev/zero bs=65536 count={count} 2>/dev/null" & true',
            )
        lans = {}
        for name in ("server", "client"):
            got = await client.get(VMI, name, NS)
            lans[name] = [i.get("ipAddress") for i in got["status"]["interfaces"]]
        print(f"guests up; VLAN addresses {lans}; {repeats} transfers of {SIZE_MIB} MiB per case",
              flush=True)  # fmt: skip
        cases = (("no policy engine", None), ("1 rule", 0), ("500 rules", 499))

        async def vlan_policy(extra: int | None) -> None:
            if extra is not None:
                await client.create(MULTI_NETWORK_POLICY, policy(extra), NS)
                await until(lambda: holds(mac))

        async def vlan_clear(extra: int | None) -> None:
            if extra is not None:
                await client.delete(MULTI_NETWORK_POLICY, "bench", NS)
                await until(lambda: not holds(mac))

        async def vlan_measure() -> float:
            return await transfer(server, ip)

        await case(server, ip, 0)  # warm-up, once the server's listener answers
        results = await interleaved(cases, repeats, vlan_policy, vlan_clear, vlan_measure)
        enforce, release = [], []
        for _ in range(repeats + 2):
            start = time.monotonic()
            await client.create(MULTI_NETWORK_POLICY, policy(499), NS)
            await until(lambda: holds(mac))
            enforce.append(time.monotonic() - start)
            start = time.monotonic()
            await client.delete(MULTI_NETWORK_POLICY, "bench", NS)
            await until(lambda: not holds(mac))
            release.append(time.monotonic() - start)
        print("VLAN cases done; the pod network's", flush=True)

        async def pod_policy(extra: int | None) -> None:
            if extra is not None:
                for body in pod_policies(extra):
                    await client.create(NETWORK_POLICY, body, NS)
                await until(pod_holds)

        async def pod_clear(extra: int | None) -> None:
            if extra is not None:
                for body in pod_policies(0):
                    await client.delete(NETWORK_POLICY, body["metadata"]["name"], NS)
                await until(lambda: not pod_holds())

        async def pod_measure() -> float:
            return await transfer(server, cluster_ip, "pclient")

        await case(server, cluster_ip, 0, "pclient")
        pod = await interleaved(cases, repeats, pod_policy, pod_clear, pod_measure)
        pod_enforce, pod_release = [], []
        egress = pod_policies(499)[1]
        for _ in range(repeats + 2):
            start = time.monotonic()
            await client.create(NETWORK_POLICY, egress, NS)
            await until(pod_holds)
            pod_enforce.append(time.monotonic() - start)
            start = time.monotonic()
            await client.delete(NETWORK_POLICY, "bench-out", NS)
            await until(lambda: not pod_holds())
            pod_release.append(time.monotonic() - start)
    report("VLAN bridge, MultiNetworkPolicy", results, enforce, release)
    report("pod network through a ClusterIP Service, NetworkPolicy", pod, pod_enforce, pod_release)


async def interleaved(
    cases: Sequence[tuple[str, int | None]],
    rounds: int,
    setup: Callable[[int | None], Awaitable[None]],
    clear: Callable[[int | None], Awaitable[None]],
    measure: Callable[[], Awaitable[float]],
) -> dict[str, list[float]]:
    """Each case's transfers over ``rounds`` rounds of one transfer per case, the order
    rotating each round (so that drift over the run, TCG's included, cancels out)."""
    seen: dict[str, list[float]] = {label: [] for label, _ in cases}
    for turn in range(rounds):
        for label, extra in [*cases[turn % len(cases) :], *cases[: turn % len(cases)]]:
            await setup(extra)
            seen[label].append(await measure())
            await clear(extra)
    return seen


def report(
    what: str, results: dict[str, list[float]], enforce: list[float], release: list[float]
) -> None:
    """Each case's median MB/s, and its throughput beside the same round's no-policy transfer:
    the median of those per-round ratios is the figure judged (the rounds' spread follows)."""
    base = results["no policy engine"]
    print(f"\n== {what}\nthroughput, client guest <- server guest ({len(base)} rounds):")
    for label, values in results.items():
        ratios = sorted(v / b for v, b in zip(values, base, strict=True))
        print(f"  {label:<18} {statistics.median(values):7.1f} MB/s  median ratio to no policy "
              f"engine in its round {statistics.median(ratios):.3f}x "
              f"(rounds {ratios[0]:.3f}x-{ratios[-1]:.3f}x)")  # fmt: skip
    ratios = [v / b for v, b in zip(results["500 rules"], base, strict=True)]
    loss = 1 - statistics.median(ratios)
    verdict = "OK" if loss <= TARGET_LOSS else "MISSED"
    print(
        f"  loss at 500 rules: {loss * 100:.1f} % beside the {TARGET_LOSS * 100:g} % target: {verdict}"
    )
    print("\ntime from the API call to the node's table (500-rule policy):")
    for label, values in (("create -> enforced", enforce), ("delete -> released", release)):
        worst = max(values)
        verdict = "OK" if worst <= TARGET_ENFORCE_S else "MISSED"
        print(f"  {label:<20} median {statistics.median(values) * 1000:6.0f} ms, worst "
              f"{worst * 1000:6.0f} ms beside the {TARGET_ENFORCE_S:g} s target: {verdict}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=9, help="rounds (default 9)")
    args = parser.parse_args()
    guest = build_guest(default_cache_dir())
    tmp = Path(tempfile.mkdtemp(prefix="vmo-bench-netpol-"))
    server: ThreadedServer | None = None
    try:
        home = tmp / "home"
        (home / "images").mkdir(parents=True)
        shutil.copy(guest.disk_qcow2, home / "images" / "disk.qcow2")
        print("starting a 1-node embedded cluster ...", flush=True)
        server = ThreadedServer(home, engine=True, nodes=1).start()
        asyncio.run(run(server, args.repeats))
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                asyncio.run(teardown(server))
            with contextlib.suppress(Exception):
                server.stop()
        leaked = kill_qemus_under(tmp)
        if leaked:
            print(f"killed QEMU processes the engine left: {leaked}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


async def teardown(server: ThreadedServer) -> None:
    """Deletes the VMs, as a user would, and waits for their VMIs to go: the agent then powers
    the guests down and removes their taps, cgroups and rules (QEMU outlives the engine, so
    stopping the engine alone would leave the guests running)."""
    async with Client.from_kubeconfig(server.kubeconfig) as client:
        for vm in (await client.list(VM, NS))[0]:
            with contextlib.suppress(NotFound):
                await client.delete(VM, vm["metadata"]["name"], NS)
        deadline = time.monotonic() + 120
        while (await client.list(VMI, NS))[0] and time.monotonic() < deadline:
            await asyncio.sleep(1)


if __name__ == "__main__":
    main()
