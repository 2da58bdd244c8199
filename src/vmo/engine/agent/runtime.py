"""One VMI on this node: its working directory, QEMU process, taps and host port forwards.

This is virt-launcher's part: the agent asks a ``VmiRuntime`` to start, pause, stop or open a
port, and reads back what the VMI's status should say.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import random
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmo.engine.network.podpolicy import Cgroups
from vmo.engine.qemu.accel import Accelerator
from vmo.engine.qemu.argv import disk_node_names
from vmo.engine.qemu.domain import DiskFormat, Domain, UserBackend
from vmo.engine.qemu.errors import QemuError
from vmo.engine.qemu.migration import MIGRATION_PORTS
from vmo.engine.qemu.process import ExitStatus, QemuProcess, adopt, find, launch
from vmo.engine.qemu.vmi import LocalVolume, NodeContext, domain_from_vmi

log = logging.getLogger(__name__)

JSON = dict[str, Any]


def workdir_name(namespace: str, name: str) -> str:
    """Short and stable: unix socket paths must stay under 108 bytes."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:12]
    return f"{name[:20]}-{digest}"


QEMU_USER = "vmo-qemu"


def qemu_user() -> str | None:
    """The unprivileged account QEMU drops to when the agent runs as root (``-runas``); None
    when the agent is unprivileged itself or the account does not exist (`make install` makes it)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        log.warning("user %s does not exist: QEMU keeps root's privileges (sandboxed)", QEMU_USER)
        return None
    return QEMU_USER


def migration_port(host: str = "127.0.0.1") -> int:
    """A free port of ``MIGRATION_PORTS`` for a migration target's listener."""
    ports = list(MIGRATION_PORTS)
    random.shuffle(ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free migration port in {MIGRATION_PORTS.start}-{MIGRATION_PORTS.stop - 1}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class VmiRuntime:
    """The node-side state of one VMI."""

    namespace: str
    name: str
    uid: str
    workdir: Path
    process: QemuProcess | None = None
    # (proto, guest port) -> host port on 127.0.0.1, for the pod network interface
    forwards: dict[tuple[str, int], int] = field(default_factory=dict)
    pod_netdev: str | None = None
    # status.interfaces details the network layer knows (IPAM addresses), by interface name
    extra_interfaces: list[JSON] = field(default_factory=list)
    stopping: bool = False
    node: str = ""
    # the files behind the VMI's volumes, by volume name (kept for status and migration)
    volumes: dict[str, LocalVolume] = field(default_factory=dict)
    # the VMI spec this runtime was started from
    spec: JSON = field(default_factory=dict)
    domain: Domain | None = None
    # disk (volume) name -> QEMU block node name (what block jobs and NBD exports name)
    disk_nodes: dict[str, str] = field(default_factory=dict)
    memory_mib: int = 0
    # layer file -> QEMU node name, for the overlays live snapshots added (QEMU knows them only
    # as fdsets, so a later merge finds them here)
    layer_nodes: dict[str, str] = field(default_factory=dict)
    # hot-plugged volumes attached to this QEMU, by volume name (engine.agent.hotplug's records)
    hotplugged: dict[str, JSON] = field(default_factory=dict)

    def volume_sources(self) -> list[tuple[JSON, LocalVolume]]:
        """(the VMI's volume entry, its local file), in the VMI's volume order."""
        return [
            (volume, self.volumes[volume["name"]])
            for volume in self.spec.get("volumes") or []
            if volume.get("name") in self.volumes
        ]

    def open_tops(self) -> list[Path]:
        """The top layer of every disk the QEMU has open, boot and hot-plugged."""
        tops = [v.path for v in self.volumes.values()]
        tops += [Path(str(rec["path"])) for rec in self.hotplugged.values() if rec.get("path")]
        return tops

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    async def start(
        self,
        vmi: JSON,
        *,
        accel: Accelerator,
        volumes: dict[str, LocalVolume],
        taps: dict[str, str],
        startup_timeout: float = 15.0,
        incoming: str | None = None,
    ) -> None:
        """Launches QEMU for the VMI; raises QemuError (or UnsupportedSpec) without leaving it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.volumes, self.spec = dict(volumes), vmi.get("spec") or {}
        ctx = NodeContext(
            workdir=self.workdir,
            accel=accel,
            volumes=volumes,
            taps=taps,
            host_ports=self._declared_ports(vmi),
            run_as=qemu_user(),
            incoming=incoming,
        )
        domain = domain_from_vmi(vmi, ctx=ctx)
        for index, nic in enumerate(domain.nics):
            if isinstance(nic.backend, UserBackend):
                self.pod_netdev = f"netdev{index}"
        self.domain, self.memory_mib = domain, domain.memory_mib
        self.disk_nodes = disk_node_names(domain)
        self.save_volumes()
        cgroup = self.make_cgroup()
        try:
            self.process = await launch(
                domain, workdir=self.workdir, startup_timeout=startup_timeout, cgroup=cgroup
            )
        except BaseException:
            self.remove_cgroup()
            raise

    def make_cgroup(self) -> Path | None:
        """The QEMU's own cgroup (``podpolicy.Cgroups``), where NetworkPolicy's egress rules
        find its sockets; None on a host without a cgroup2 hierarchy nft can name."""
        cgroups = Cgroups.detect()
        if cgroups is None or not self.node:
            return None
        try:
            return cgroups.create(self.node, self.namespace, self.name)
        except OSError as exc:
            log.warning("VMI %s/%s: no cgroup of its own: %s", self.namespace, self.name, exc)
            return None

    def remove_cgroup(self) -> None:
        cgroups = Cgroups.detect()
        if cgroups is not None and self.node:
            cgroups.remove(self.node, self.namespace, self.name)

    def _declared_ports(self, vmi: JSON) -> dict[str, int]:
        """Host ports for the masquerade interface's declared ``ports`` (fixed at launch)."""
        ports: dict[str, int] = {}
        for iface in vmi["spec"]["domain"]["devices"].get("interfaces") or []:
            for port in iface.get("ports") or []:
                proto = str(port.get("protocol") or "TCP").lower()
                host = free_port()
                ports[f"{iface['name']}/{proto}/{port['port']}"] = host
                self.forwards[(proto, int(port["port"]))] = host
        return ports

    def save_volumes(self) -> None:
        """What ``adopt`` needs to know again: the files behind the volumes, and the spec."""
        data = {
            "spec": self.spec,
            "disk_nodes": self.disk_nodes,
            "layer_nodes": self.layer_nodes,
            "hotplugged": self.hotplugged,
            "memory_mib": self.domain.memory_mib if self.domain else self.memory_mib,
            "volumes": {
                name: {
                    "path": str(v.path),
                    "format": str(v.format),
                    "shared": v.shared,
                    "claim": list(v.claim) if v.claim else None,
                    "backing": str(v.backing) if v.backing else None,
                    "readonly": v.readonly,
                    "virtual_size": v.virtual_size,
                }
                for name, v in self.volumes.items()
            },
        }
        tmp = self.workdir / ".volumes.json.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.workdir / "volumes.json")

    def _load_volumes(self) -> None:
        try:
            data = json.loads((self.workdir / "volumes.json").read_text())
        except (OSError, ValueError):
            return
        self.spec = data.get("spec") or {}
        self.disk_nodes = dict(data.get("disk_nodes") or {})
        self.layer_nodes = dict(data.get("layer_nodes") or {})
        self.hotplugged = dict(data.get("hotplugged") or {})
        self.memory_mib = int(data.get("memory_mib") or 0)
        self.volumes = {
            name: LocalVolume(
                Path(v["path"]),
                DiskFormat(v["format"]),
                shared=bool(v.get("shared")),
                claim=(str(v["claim"][0]), str(v["claim"][1])) if v.get("claim") else None,
                backing=Path(v["backing"]) if v.get("backing") else None,
                readonly=bool(v.get("readonly")),
                virtual_size=int(v.get("virtual_size") or 0),
            )
            for name, v in (data.get("volumes") or {}).items()
        }

    async def adopt(self) -> bool:
        """Re-attaches to a QEMU left running by an earlier agent: True when it did, False only
        when no QEMU runs in the workdir (the kernel says so, by pid and start time).

        A QEMU that runs but does not answer on QMP raises ``ProcessError``: it is not gone, so
        its VMI must not be reported as if it were (the caller retries, or ``stop``s it).
        """
        self._load_volumes()
        try:
            self.process = await adopt(self.workdir)
        except QemuError as exc:
            log.warning("%s/%s: QEMU in %s does not answer: %s", *self.key, self.workdir, exc)
            raise
        return self.process is not None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exit_status is None

    async def wait_exit(self) -> ExitStatus:
        assert self.process is not None
        return await self.process.wait_exit()

    async def qmp(self, command: str, arguments: JSON | None = None) -> Any:
        if self.process is None:
            raise QemuError(f"{self.namespace}/{self.name} has no QEMU")
        client = await self.process.qmp()
        return await client.execute(command, arguments)

    async def pause(self) -> None:
        await self.qmp("stop")

    async def unpause(self) -> None:
        await self.qmp("cont")

    async def soft_reboot(self) -> None:
        await self.qmp("system_reset")

    async def running_state(self) -> str:
        status = await self.qmp("query-status")
        return str(status.get("status", "unknown"))

    async def host_port(self, proto: str, guest_port: int) -> int | None:
        """The 127.0.0.1 port forwarded to ``guest_port`` on the pod network, opened on demand."""
        proto = proto.lower()
        known = self.forwards.get((proto, guest_port))
        if known is not None:
            return known
        if self.pod_netdev is None or not self.alive:
            return None
        host = free_port()
        rule = f"{proto}:127.0.0.1:{host}-:{guest_port}"
        reply = await self.qmp(
            "human-monitor-command", {"command-line": f"hostfwd_add {self.pod_netdev} {rule}"}
        )
        if reply:
            log.warning("%s/%s: hostfwd_add %s: %s", self.namespace, self.name, rule, reply)
            return None
        self.forwards[(proto, guest_port)] = host
        return host

    async def stop(self, grace: float) -> ExitStatus | None:
        """ACPI power-down, then signals after ``grace`` seconds (terminationGracePeriodSeconds);
        returns once QEMU has exited. Without a handle (the VMI was never adopted, or its QEMU
        does not answer) the QEMU left in the workdir is found and stopped all the same."""
        process = self._claim_leftover()
        if process is None or process.exit_status is not None:
            return None if process is None else process.exit_status
        return await process.powerdown(grace)

    async def kill(self) -> ExitStatus | None:
        """SIGKILL, like ``stop`` with no grace and no power button; returns once QEMU has exited."""
        process = self._claim_leftover()
        if process is None or process.exit_status is not None:
            return None if process is None else process.exit_status
        return await process.kill()

    def _claim_leftover(self) -> QemuProcess | None:
        self.stopping = True
        if self.process is None:
            self.process = find(self.workdir)
            if self.process is not None:
                log.info(
                    "%s/%s: stopping QEMU %d left in %s", *self.key, self.process.pid, self.workdir
                )
        return self.process

    async def close(self) -> None:
        """Forgets the process without touching it (agent shutdown: QEMU keeps running)."""
        if self.process is not None:
            await self.process.detach()

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.remove_cgroup()

    def stderr_tail(self) -> str:
        if self.process is None:
            return ""
        return "; ".join(self.process.last_stderr_lines(5))
