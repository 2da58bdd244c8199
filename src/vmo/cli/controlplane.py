"""``vmo up``, ``vmo down`` and ``vmo status``: the embedded control plane's life on this host.

Whether a server lives is the lock it holds on its pid file (``vmo.home.ServerLock``), never a
pid probe. ``up -d`` returns once the API server answers and every node it started is Ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from vmo.apiserver.audit import DEFAULT_POLICY, AuditLog, AuditPolicyError, load_policy
from vmo.apiserver.oidc import OIDCConfig, OIDCConfigError
from vmo.apiserver.server import ApiServer
from vmo.cli import monitoring
from vmo.cli._common import state_dir
from vmo.client import NODE, TRANSIENT_ERRORS, ApiStatusError, Client, Credentials
from vmo.engine.bmc import Bmc
from vmo.engine.embedded import Engine
from vmo.engine.virtcontroller.nodelifecycle import GRACE_ENV
from vmo.home import PRIVATE_UMASK, AlreadyRunning, StateDir

JSON = dict[str, Any]
log = logging.getLogger(__name__)

UP_TIMEOUT = 120.0  # the API server, then each node's accelerator probe and registration
STOP_TIMEOUT = 15.0
_POLL = 0.1


class StartFailed(Exception):
    """``vmo up -d`` gave up on the server it started; the message says why."""


# --- decisions (pure) -------------------------------------------------------------------------


def started_nodes(count: int, *, engine: bool) -> list[str]:
    """The nodes ``vmo up --nodes count`` runs, named as ``Engine`` names them."""
    return [f"node-{index}" for index in range(1, count + 1)] if engine else []


def unready_nodes(
    nodes: Sequence[JSON], wanted: Sequence[str], *, since: datetime
) -> dict[str, str]:
    """Wanted node -> why it is not Ready yet. Ready means condition Ready=True with a heartbeat
    from this start: a Node kept in the store from an earlier run does not count."""
    by_name = {n["metadata"]["name"]: n for n in nodes}
    why: dict[str, str] = {}
    for name in wanted:
        node = by_name.get(name)
        ready = _ready_condition(node) if node else None
        if node is None:
            why[name] = "not registered"
        elif ready is None or ready.get("status") != "True":
            reason = (ready or {}).get("reason") or "no Ready condition"
            why[name] = f"Ready={(ready or {}).get('status', 'Unknown')} ({reason})"
        elif _parse_time(ready.get("lastHeartbeatTime")) < since:
            why[name] = "no heartbeat since this start"
    return why


def _ready_condition(node: JSON) -> JSON | None:
    conditions = node.get("status", {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Ready"), None)


def _parse_time(stamp: str | None) -> datetime:
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


# --- up -----------------------------------------------------------------------------------------


def audit_log(args: argparse.Namespace, state: StateDir) -> AuditLog:
    """The audit log ``vmo up``'s flags ask for (kube-apiserver's ``--audit-*`` where it has
    them); AuditPolicyError when the policy file is not one."""
    policy = load_policy(Path(args.audit_policy_file)) if args.audit_policy_file else DEFAULT_POLICY
    directory = Path(args.audit_log_dir) if args.audit_log_dir else state.root / "audit"
    return AuditLog(directory, policy, max_bytes=args.audit_log_maxsize << 20,
                    backups=args.audit_log_maxbackup)  # fmt: skip


def oidc_config(args: argparse.Namespace) -> OIDCConfig | None:
    """kube-apiserver's ``--oidc-*`` flags; OIDCConfigError naming the flag when they are wrong."""
    if not args.oidc_issuer_url:
        return None
    return OIDCConfig(
        issuer_url=args.oidc_issuer_url,
        client_id=args.oidc_client_id,
        username_claim=args.oidc_username_claim,
        username_prefix=args.oidc_username_prefix,
        groups_claim=args.oidc_groups_claim,
        groups_prefix=args.oidc_groups_prefix,
        ca_file=args.oidc_ca_file,
        signing_algs=tuple(a for a in args.oidc_signing_algs.split(",") if a),
    )


def cmd_up(args: argparse.Namespace) -> int:
    # before the home exists: every file and directory the control plane makes is its owner's
    os.umask(PRIVATE_UMASK)
    state = state_dir(args)
    state.prepare()
    pid = state.server_lock.holder()
    if pid is not None:
        print(f"VMO is already running (pid {pid}) at {probe(state) or 'an unknown address'}")
        return 0
    try:
        audit_log(args, state)  # a bad policy file is refused before anything starts
    except AuditPolicyError as exc:
        print(f"vmo up: --audit-policy-file: {exc}", file=sys.stderr)
        return 2
    try:
        oidc_config(args)
    except OIDCConfigError as exc:
        print(f"vmo up: {exc}", file=sys.stderr)
        return 2
    if args.detach:
        return _up_detached(args, state)
    return _up_foreground(args, state)


def _up_foreground(args: argparse.Namespace, state: StateDir) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        state.server_lock.claim()  # until this process dies, whatever it dies of
    except AlreadyRunning as exc:
        print(f"vmo up: VMO is already running (pid {exc.pid}) in {state.root}", file=sys.stderr)
        return 1
    asyncio.run(_serve(args, state))
    return 0


async def _serve(args: argparse.Namespace, state: StateDir) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = ApiServer(
        state, host=args.host, port=args.port, audit=audit_log(args, state), oidc=oidc_config(args)
    )
    url = await server.start()
    engine = None
    bmc: Bmc | None = None
    controllers: asyncio.Task[None] | None = None
    prometheus: asyncio.Task[None] | None = None
    if not args.no_monitoring:
        settings = monitoring.Settings.from_args(args)
        address = url.removeprefix("https://")
        prometheus = loop.create_task(
            monitoring.supervise(state, address, settings, stop), name="vmo-prometheus"
        )
    if args.node_monitor_grace_period:
        os.environ[GRACE_ENV] = str(args.node_monitor_grace_period)
    try:
        if not args.no_engine:
            engine = Engine(state, nodes=args.nodes)
            await engine.start(stop)
            # the embedded nodes' Redfish BMC (HA fences a lost node through it)
            bmc = Bmc(state)
            await bmc.start()
            assert engine.client is not None
            await bmc.publish(engine.client)
            if not args.no_controllers:
                controllers = loop.create_task(_controllers(state, stop), name="vmo-controllers")
        print(f"VMO API server ready at {url}", flush=True)
        print(f"kubectl --kubeconfig {state.kubeconfig} get namespaces", flush=True)
        await stop.wait()
    finally:
        if controllers is not None or prometheus is not None:
            stop.set()  # the controllers' process and Prometheus go with the control plane
            await asyncio.gather(
                *(t for t in (controllers, prometheus) if t is not None), return_exceptions=True
            )
        if bmc is not None:
            await bmc.stop()
        if engine is not None:
            await engine.close()
        await server.stop()


async def _controllers(state: StateDir, stop: asyncio.Event) -> None:
    """VMO's own controllers (backup, access, quotas), as ``vmo controllers run`` runs them: a
    process of their own (sharing the API server's event loop, a bulk change would slow every
    request), over HTTPS with the admin's credentials, under the controllers' Lease, logging to
    ``controllers.log``. It is stopped with the control plane; if it dies, it is started again."""
    argv = [sys.executable, "-m", "vmo.cli.main", "--home", str(state.root), "controllers", "run",
            "--kubeconfig", str(state.kubeconfig),
            "--backup-root", str(state.root / "backups"), "--metrics-announce"]  # fmt: skip
    while not stop.is_set():
        with (state.root / "controllers.log").open("ab") as logfile:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile
            )
        waiter = asyncio.ensure_future(proc.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopped], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(waiter, STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await waiter
            return
        stopped.cancel()
        log.error("VMO's controllers exited with %s; starting them again", proc.returncode)
        await asyncio.sleep(2.0)


def _server_argv(args: argparse.Namespace, state: StateDir) -> list[str]:
    argv = [sys.executable, "-m", "vmo.cli.main", "--home", str(state.root), "up"]
    argv += ["--host", args.host, "--port", str(args.port), "--nodes", str(args.nodes)]
    if args.node_monitor_grace_period:
        argv += ["--node-monitor-grace-period", str(args.node_monitor_grace_period)]
    if args.no_controllers:
        argv.append("--no-controllers")
    if args.audit_policy_file:
        argv += ["--audit-policy-file", str(Path(args.audit_policy_file).resolve())]
    if args.audit_log_dir:
        argv += ["--audit-log-dir", str(Path(args.audit_log_dir).resolve())]
    for flag in ("issuer_url", "client_id", "username_claim", "groups_claim", "groups_prefix",
                 "ca_file", "signing_algs"):  # fmt: skip
        value = getattr(args, f"oidc_{flag}")
        if value:
            argv += [f"--oidc-{flag.replace('_', '-')}", str(value)]
    if args.oidc_username_prefix is not None:
        argv += ["--oidc-username-prefix", args.oidc_username_prefix]
    argv += ["--audit-log-maxsize", str(args.audit_log_maxsize),
             "--audit-log-maxbackup", str(args.audit_log_maxbackup)]  # fmt: skip
    argv += monitoring.up_flags_argv(args)
    return [*argv, "--no-engine"] if args.no_engine else argv


def _up_detached(args: argparse.Namespace, state: StateDir) -> int:
    with contextlib.suppress(FileNotFoundError):
        state.url_file.unlink()
    log_fd = os.open(state.logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.fchmod(log_fd, 0o600)  # a log an older VMO left 0644
    with os.fdopen(log_fd, "ab") as log:
        proc = subprocess.Popen(
            _server_argv(args, state),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    nodes = started_nodes(args.nodes, engine=not args.no_engine)
    try:
        url = asyncio.run(_await_up(proc, state, nodes=nodes, timeout=args.timeout))
    except StartFailed as exc:
        print(f"vmo up: {exc}; see {state.logfile}", file=sys.stderr)
        return 1
    print(f"VMO is running (pid {proc.pid}) at {url}")
    if nodes:
        print(f"  nodes:      {', '.join(nodes)} (Ready)")
    print(f"  kubeconfig: {state.kubeconfig}")
    print(f"  log:        {state.logfile}")
    return 0


async def _await_up(
    proc: subprocess.Popen[bytes], state: StateDir, *, nodes: Sequence[str], timeout: float
) -> str:
    """Waits for the API server, then for ``nodes`` to be Ready; returns the server's URL."""
    deadline = time.monotonic() + timeout
    since = datetime.now(UTC).replace(microsecond=0)
    creds = await _await_server(proc, state, deadline=deadline, timeout=timeout)
    if nodes:
        async with Client(creds) as client:
            await await_nodes_ready(
                client, nodes, since=since, deadline=deadline, alive=lambda: _alive(proc)
            )
    return creds.server


async def _await_server(
    proc: subprocess.Popen[bytes], state: StateDir, *, deadline: float, timeout: float
) -> Credentials:
    while time.monotonic() < deadline:
        _alive(proc)
        creds = admin_credentials(state)
        if creds is not None and await _answers(creds):
            return creds
        await asyncio.sleep(_POLL)
    raise StartFailed(f"the API server did not become ready in {timeout:g}s")


def _alive(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        raise StartFailed(f"the server exited with code {proc.returncode}")


async def await_nodes_ready(
    client: Client,
    nodes: Sequence[str],
    *,
    since: datetime,
    deadline: float,
    alive: Callable[[], None] | None = None,
) -> None:
    """Returns once every node in ``nodes`` is Ready (see ``unready_nodes``); raises
    StartFailed naming those that are not when ``deadline`` (monotonic) passes."""
    why = dict.fromkeys(nodes, "not registered")
    while True:
        if alive is not None:
            alive()
        with contextlib.suppress(*TRANSIENT_ERRORS, ApiStatusError):
            items, _ = await client.list(NODE)
            why = unready_nodes(items, nodes, since=since)
        if not why:
            return
        if time.monotonic() >= deadline:
            named = "; ".join(f"{name}: {reason}" for name, reason in why.items())
            raise StartFailed(f"not every node became Ready in time: {named}")
        await asyncio.sleep(_POLL)


# --- probes ---------------------------------------------------------------------------------


def admin_credentials(state: StateDir) -> Credentials | None:
    """The admin's credentials, aimed at the address the server last wrote (None before)."""
    try:
        url = state.url_file.read_text().strip()
        config = yaml.safe_load(state.kubeconfig.read_text())
        token = str(config["users"][0]["user"]["token"])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return None
    return Credentials(server=url, token=token, ca_file=str(state.pki / "ca.crt"))


async def _answers(creds: Credentials) -> bool:
    async with Client(creds) as client:
        return await client.healthy()


def probe(state: StateDir) -> str | None:
    """The running server's URL when it answers ``/readyz``, else None."""
    creds = admin_credentials(state)
    return creds.server if creds is not None and asyncio.run(_answers(creds)) else None


# --- down / status ----------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    state = state_dir(args)
    code = _stop_control_plane(state)
    if args.stop_vms and code == 0:
        # after the control plane, so no controller restarts the guests being stopped
        _stop_guests(state)
    return code


def _stop_control_plane(state: StateDir) -> int:
    lock = state.server_lock
    pid = lock.holder()
    if pid is None:
        print("VMO is not running")
        return 0
    if pid == 0:
        print(f"vmo down: {lock.path} is locked by a process that names no pid", file=sys.stderr)
        return 1
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while lock.holder() is not None:
        if time.monotonic() >= deadline:
            print(f"vmo down: pid {pid} did not stop in {STOP_TIMEOUT:g}s", file=sys.stderr)
            return 1
        time.sleep(_POLL)
    print("VMO stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = state_dir(args)
    pid = state.server_lock.holder()
    if pid is None:
        print("VMO is not running")
        return 3
    url = probe(state)
    print(f"VMO is running (pid {pid})")
    print(f"  API server: {url or 'not answering'}")
    print(f"  kubeconfig: {state.kubeconfig}")
    return 0 if url else 1


# --- guests ---------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _guest_pids(state: StateDir) -> list[int]:
    """QEMU processes VMO started under this state directory (their pidfile and cmdline agree)."""
    pids = []
    for pidfile in state.nodes.glob("*/vms/*/qemu.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(pidfile.parent).encode() in cmdline:
            pids.append(pid)
    return pids


def _stop_guests(state: StateDir) -> None:
    pids = _guest_pids(state)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        print(f"stopped {len(pids)} guest(s)")
    from vmo.engine.network.bridge import NetworkState, cleanup_orphans

    for node_dir in sorted(state.nodes.glob("*")):
        removed = cleanup_orphans(NetworkState(node_dir))
        if removed:
            print(f"removed {len(removed)} tap(s) of {node_dir.name}")


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="start the embedded control plane")
    up.add_argument(
        "-d", "--detach", action="store_true", help="run as a daemon (pid and log files)"
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=6443)
    up.add_argument("-v", "--verbose", action="store_true")
    up.add_argument("--nodes", type=int, default=1, help="node agents to run on this host")
    up.add_argument(
        "--node-monitor-grace-period",
        type=float,
        default=None,
        help="seconds without a node's heartbeat before it is Ready=Unknown and tainted "
        "unreachable (kube-controller-manager's flag; default 50)",
    )
    up.add_argument(
        "--no-engine", action="store_true", help="API server only: no controllers, no node"
    )
    up.add_argument(
        "--no-controllers",
        action="store_true",
        help="without VMO's own controllers (backup, access): run them with `vmo controllers run`",
    )
    up.add_argument(
        "--audit-policy-file",
        default="",
        help="an audit.k8s.io/v1 Policy (default: every request at Metadata level)",
    )
    up.add_argument("--audit-log-dir", default="", help="default: the home's audit/")
    up.add_argument(
        "--audit-log-maxsize",
        type=int,
        default=100,
        metavar="MB",
        help="rotate the log at this size",
    )
    up.add_argument("--audit-log-maxbackup", type=int, default=10, help="rotated files to keep")
    up.add_argument(
        "--oidc-issuer-url", default="", help="accept this OpenID Connect issuer's ID tokens"
    )
    up.add_argument("--oidc-client-id", default="", help="the audience the tokens must hold")
    up.add_argument("--oidc-username-claim", default="sub")
    up.add_argument(
        "--oidc-username-prefix",
        default=None,
        help="default: the issuer URL and '#' (none for email); '-' for none",
    )
    up.add_argument("--oidc-groups-claim", default="")
    up.add_argument("--oidc-groups-prefix", default="")
    up.add_argument("--oidc-ca-file", default="", help="the CA of the issuer's certificate")
    up.add_argument("--oidc-signing-algs", default="RS256")
    up.add_argument(
        "--timeout",
        type=float,
        default=UP_TIMEOUT,
        metavar="S",
        help="with -d: how long to wait for the API server and the nodes to be Ready",
    )
    monitoring.add_up_flags(up)
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the embedded control plane (guests keep running)")
    down.add_argument("--stop-vms", action="store_true", help="also stop every guest VMO started")
    down.set_defaults(func=cmd_down)
    sub.add_parser("status", help="is the control plane running?").set_defaults(func=cmd_status)
