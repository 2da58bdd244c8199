"""virtctl's verbs in `vmo`, end to end: the real commands against the real server and one real
guest (QEMU, TCG) shared by the module. Boots a guest: run under the VM lock.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Api, Kubectl, make_user
from tests.test_kubevirt_models import upstream_errors
from tests.test_vm_e2e import (
    BOOT_TIMEOUT,
    NS,
    datavolume,
    engine_cluster,
    tcp_line,
    vm,
    vmi_of,
    wait_for,
    wait_running,
)
from vmo.cli import virtctl
from vmo.engine.agent.api import filesystem_list, user_list
from vmo.testing.apiserver import ThreadedServer

NAME = "vctl"
VM_PATH = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines"
VMIM_PATH = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstancemigrations"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-virtctl"))


@pytest.fixture(scope="module")
def booted(cluster: ThreadedServer, capi: Api, image_server: str) -> ThreadedServer:
    """The VM ``vctl`` (labelled app=vctl) running, its TCP service on 5432 answering."""
    k = Kubectl(cluster.kubeconfig)
    k.apply(datavolume(f"{NAME}-root", f"{image_server}/disk.qcow2"))
    k.apply(vm(NAME, disk=f"{NAME}-root", labels={"app": NAME}))
    wait_running(capi, NAME)
    wait_for(lambda: stdio_line(cluster, f"vmi/{NAME}", 5432), BOOT_TIMEOUT, "the guest's 5432")
    return cluster


def vmo(
    cluster: ThreadedServer,
    *args: str,
    kubeconfig: Path | None = None,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    config = str(kubeconfig or cluster.kubeconfig)
    argv = [sys.executable, "-m", "vmo.cli.main", *args, "-n", NS, "--kubeconfig", config]
    return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)


def ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, run.stderr + run.stdout
    assert "Traceback" not in run.stderr
    return run.stdout


def refused(run: subprocess.CompletedProcess[str]) -> str:
    """The error line of a failed command (non-zero exit, no traceback)."""
    assert run.returncode != 0, run.stdout
    assert "Traceback" not in run.stderr
    return run.stderr


def stdio_line(cluster: ThreadedServer, target: str, port: int) -> str:
    """What the guest's port answers through ``vmo port-forward --stdio=true``."""
    run = vmo(cluster, "port-forward", "--stdio=true", target, str(port), input="")
    if run.returncode != 0 or not run.stdout:
        raise AssertionError(f"exit {run.returncode}: {run.stderr}")  # wait_for's last answer
    return run.stdout


def vmi_conditions(capi: Api) -> dict[str, str]:
    vmi = vmi_of(capi, NAME) or {}
    return {c["type"]: c["status"] for c in vmi.get("status", {}).get("conditions") or []}


def run_strategy(capi: Api) -> str:
    return str(capi.get(f"{VM_PATH}/{NAME}").json()["spec"].get("runStrategy"))


# --- create: manifests that upstream's schema and the server accept ----------------------------


def server_accepts(cluster: ThreadedServer, manifest: str) -> None:
    Kubectl(cluster.kubeconfig)("create", "--dry-run=server", "-f", "-", input=manifest)


CREATE_VM_CASES = {
    "defaults": ["--name", "plain"],
    "imports-and-pvc": [
        "--name=disks",
        "--run-strategy=halted",
        "--volume-import=type:http,url:http://images.example/disk.qcow2,size:1Gi,name:disks-root",
        "--volume-import=type:blank,size:64Mi,name:scratch,bootorder:2",
        "--volume-pvc=src:shared-data,bootorder:1",
        "--user=cloud",
        "--ssh-key=ssh-ed25519 AAAAC3Nza test@example",
    ],
    "instancetype": [
        "--name=typed",
        "--instancetype=virtualmachineclusterinstancetype/small",
        "--preference=tidy",
        "--cloud-init-user-data=" + base64.b64encode(b"#cloud-config\n").decode(),
    ],
}


@pytest.mark.parametrize("case", CREATE_VM_CASES, ids=list(CREATE_VM_CASES))
def test_create_vm_prints_a_vm_that_upstream_and_the_server_accept(
    cluster: ThreadedServer, case: str
) -> None:
    out = ok(vmo(cluster, "create", "vm", *CREATE_VM_CASES[case]))
    manifest = yaml.safe_load(out)
    assert manifest["kind"] == "VirtualMachine" and manifest["metadata"]["namespace"] == NS
    assert upstream_errors(manifest) == []
    if case != "instancetype":  # the server resolves instancetypes, and "small" does not exist
        server_accepts(cluster, out)


def test_create_vm_follows_virtctls_defaults_and_volume_order(cluster: ThreadedServer) -> None:
    vm_obj = yaml.safe_load(ok(vmo(cluster, "create", "vm", *CREATE_VM_CASES["imports-and-pvc"])))
    spec = vm_obj["spec"]["template"]["spec"]
    assert vm_obj["spec"]["runStrategy"] == "Halted"
    assert spec["terminationGracePeriodSeconds"] == 180
    assert spec["domain"]["memory"] == {"guest": "512Mi"}
    assert [v["name"] for v in spec["volumes"]] == [
        "shared-data",
        "disks-root",
        "scratch",
        "cloudinitdisk",
    ]
    assert spec["domain"]["devices"]["disks"] == [
        {"name": "shared-data", "bootOrder": 1},
        {"name": "scratch", "bootOrder": 2},
    ]
    templates = {t["metadata"]["name"]: t["spec"] for t in vm_obj["spec"]["dataVolumeTemplates"]}
    assert templates["scratch"] == {
        "source": {"blank": {}},
        "storage": {"resources": {"requests": {"storage": "64Mi"}}},
    }
    user_data = spec["volumes"][-1]["cloudInitNoCloud"]["userData"]
    assert user_data.startswith("#cloud-config\nuser: cloud\nssh_authorized_keys:")


def test_create_instancetype_and_preference_are_accepted(cluster: ThreadedServer) -> None:
    for args in (
        ["instancetype", "--name=small", "--cpu=2", "--memory=1Gi"],
        ["preference", "--name=tidy", "--cpu-topology=spread", "--machine-type=q35"],
    ):
        namespaced = yaml.safe_load(ok(vmo(cluster, "create", *args)))
        assert namespaced["kind"] in ("VirtualMachineInstancetype", "VirtualMachinePreference")
        assert upstream_errors(namespaced) == []
        server_accepts(cluster, yaml.safe_dump(namespaced))
        run = subprocess.run(
            [sys.executable, "-m", "vmo.cli.main", "create", *args],
            capture_output=True,
            text=True,
            check=True,
        )
        clustered = yaml.safe_load(run.stdout)
        assert clustered["kind"].startswith("VirtualMachineCluster")
        assert "namespace" not in clustered["metadata"] and upstream_errors(clustered) == []
        server_accepts(cluster, run.stdout)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["vm", "--run-strategy=Sometimes"], '"--run-strategy" flag: invalid run strategy'),
        (["vm", "--volume-import=type:http,size:1Gi"], "url is required with http"),
        (["vm", "--volume-import=type:ftp,url:x"], 'invalid volume import type "ftp"'),
        (["vm", "--volume-pvc=src:other/claim"], "not allowed to specify namespace of pvc"),
        (["vm", "--memory=lots"], '"--memory" flag'),
        (["vm", "--memory=1Gi", "--instancetype=x"], "[memory instancetype]"),
        (
            ["vm", "--volume-pvc=src:a,bootorder:1", "--volume-pvc=src:b,bootorder:1"],
            "bootorder 1 was specified multiple times",
        ),
        (["instancetype", "--cpu=0", "--memory=1Gi"], "cpu value must be greater than zero"),
        (["preference", "--cpu-topology=cubes"], '"--cpu-topology" flag'),
    ],
)
def test_create_refuses_bad_flags_naming_the_flag(
    cluster: ThreadedServer, args: list[str], error: str
) -> None:
    assert error in refused(vmo(cluster, "create", *args))


# --- version ---------------------------------------------------------------------------------


def test_version_prints_the_client_and_the_servers_version(cluster: ThreadedServer) -> None:
    out = ok(vmo(cluster, "version"))
    client, server = out.splitlines()
    assert client.startswith('Client Version: version.Info{GitVersion:"v')
    assert server.startswith('Server Version: version.Info{GitVersion:"v') and "Platform:" in server
    info = Api(cluster.url, cluster.ca, cluster.admin_token).get(
        "/apis/subresources.kubevirt.io/v1/version"
    )
    assert set(info.json()) == {
        "gitVersion",
        "gitCommit",
        "gitTreeState",
        "buildDate",
        "goVersion",
        "compiler",
        "platform",
    }


# --- ssh and scp: OpenSSH's argv ---------------------------------------------------------------


def ssh_args(**overrides: Any) -> argparse.Namespace:
    values: dict[str, Any] = {
        "target": f"vmi/{NAME}",
        "command": "",
        "username": None,
        "identity_file": "",
        "known_hosts": "",
        "port": 22,
        "local_ssh_opts": [],
        "kubeconfig": "/home/u/kc",
        "home": "",
    }
    return argparse.Namespace(**{**values, **overrides})


def test_ssh_argv_is_virtctls_with_vmo_port_forward_as_proxy_command() -> None:
    args = ssh_args(
        target=f"alice@vm/{NAME}/other",
        command="uname -a",
        identity_file="/k/id",
        local_ssh_opts=["-o StrictHostKeyChecking=no"],
        port=2222,
    )
    proxy = (
        f"ProxyCommand={sys.executable} -m vmo.cli.main port-forward --stdio=true "
        f"vm/{NAME}/other 2222 --kubeconfig=/home/u/kc"
    )
    assert virtctl.ssh_command(args, NS) == [
        "ssh",
        "-o",
        proxy,
        "-o",
        "StrictHostKeyChecking=no",
        "-i",
        "/k/id",
        f"alice@vm.{NAME}.other",
        "uname -a",
    ]


def test_scp_argv_names_the_remote_side_as_virtctl_does(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("USER", "USERNAME", "LOGNAME"):
        monkeypatch.delenv(variable, raising=False)  # no user: ssh's own default applies
    args = ssh_args(
        source="notes.txt", destination=f"vmi/{NAME}:/tmp/", recursive=True, preserve=False
    )
    argv = virtctl.scp_command(args, NS)
    assert argv[-3:] == ["-r", "notes.txt", f"vmi.{NAME}.{NS}:/tmp/"]
    with pytest.raises(virtctl.CommandError, match="none of the two provided locations"):
        virtctl.scp_command(ssh_args(source="a", destination="b"), NS)


def test_proxy_command_quotes_what_a_shell_would_split() -> None:
    target = virtctl.Target("vmi", NAME, NS)
    proxy = virtctl.proxy_command(target, 22, vmo=["/opt/my vmo/python", "-m", "vmo.cli.main"])
    assert proxy.startswith("ProxyCommand='/opt/my vmo/python' -m vmo.cli.main")


# --- the guest agent's reports -----------------------------------------------------------------


def test_guest_agent_answers_take_kubevirts_shape() -> None:
    fsinfo = [
        {
            "name": "vda1",
            "mountpoint": "/",
            "type": "ext4",
            "used-bytes": 1024,
            "total-bytes": 4096,
            "disk": [{"bus-type": "virtio", "serial": "root-disk", "bus": 0, "target": 0}],
        }
    ]
    assert filesystem_list(fsinfo)["items"] == [
        {
            "diskName": "vda1",
            "mountPoint": "/",
            "fileSystemType": "ext4",
            "usedBytes": 1024,
            "totalBytes": 4096,
            "disk": [{"busType": "virtio", "serial": "root-disk"}],
        }
    ]
    users = [{"user": "alice", "login-time": 1764680000.25}, {"user": "bob", "domain": "CORP"}]
    assert user_list(users) == {
        "metadata": {},
        "items": [
            {"userName": "alice", "loginTime": 1764680000.25},
            {"userName": "bob", "domain": "CORP"},
        ],
    }


def test_guestosinfo_prints_the_subresources_json(booted: ThreadedServer) -> None:
    info = wait_for(
        lambda: (
            json.loads(run.stdout)
            if (run := vmo(booted, "guestosinfo", NAME)).returncode == 0
            else None
        ),
        BOOT_TIMEOUT,
        "the guest agent",
    )
    assert info["kernelRelease"] and "machine" in info


def test_fslist_and_userlist_print_kubevirts_lists(booted: ThreadedServer) -> None:
    fslist = json.loads(ok(vmo(booted, "fslist", NAME)))
    assert set(fslist) == {"metadata", "items"}
    for fs in fslist["items"]:
        assert {"diskName", "mountPoint", "fileSystemType", "usedBytes", "totalBytes"} <= set(fs)
    # the guest's root is its initramfs, which qemu-ga leaves out; the cloud-init seed is a disk
    seed = [fs for fs in fslist["items"] if fs["mountPoint"] == "/run/vmo/seed"]
    assert seed and seed[0]["fileSystemType"] == "iso9660" and seed[0]["totalBytes"] > 0
    userlist = json.loads(ok(vmo(booted, "userlist", NAME)))
    assert set(userlist) == {"metadata", "items"} and isinstance(userlist["items"], list)


def test_guest_reports_of_a_missing_vmi_name_it(booted: ThreadedServer) -> None:
    error = refused(vmo(booted, "fslist", "nosuch"))
    assert "Error listing filesystems of VirtualMachineInstance nosuch" in error
    assert '"nosuch" not found' in error


# --- port-forward --stdio, ssh, scp through the guest ------------------------------------------


def test_port_forward_stdio_carries_the_guests_answer_for_vm_and_vmi(
    booted: ThreadedServer,
) -> None:
    assert stdio_line(booted, f"vmi/{NAME}", 5432).startswith(f"vmo-guest {NAME}")
    assert stdio_line(booted, f"vm/{NAME}/{NS}", 5432).startswith(f"vmo-guest {NAME}")


def test_port_forward_stdio_carries_stdin_to_the_guest(booted: ThreadedServer) -> None:
    argv = [sys.executable, "-m", "vmo.cli.main", "port-forward", "--stdio=true", f"vmi/{NAME}"]
    argv += ["7", "-n", NS, "--kubeconfig", str(booted.kubeconfig)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"ping through the tunnel\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"ping through the tunnel\n"  # the guest's echo
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


SSH_QUIET = [
    "-t",
    "-o BatchMode=yes",
    "-t",
    "-o StrictHostKeyChecking=no",
    "-t",
    "-o UserKnownHostsFile=/dev/null",
    "-t",
    "-o ConnectTimeout=30",
    "--local-ssh-opts=-v",  # argparse takes a lone "-v" for an option, not for -t's value
]


def test_ssh_runs_openssh_through_the_port_forward_tunnel(booted: ThreadedServer) -> None:
    """The guest has no sshd: OpenSSH reads the line its port 5432 sends as a pre-banner line,
    which proves the bytes came through ProxyCommand, WebSocket and agent; then it gives up."""
    error = refused(vmo(booted, "ssh", "-p", "5432", *SSH_QUIET, f"root@vmi/{NAME}"))
    assert f"banner line 0: vmo-guest {NAME}" in error


def test_scp_runs_through_the_same_tunnel(booted: ThreadedServer, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    run = vmo(booted, "scp", "-p", "5432", *SSH_QUIET, str(tmp_path / "f"), f"root@vm/{NAME}:/tmp/")
    assert f"banner line 0: vmo-guest {NAME}" in refused(run)


def test_ssh_to_a_bad_target_says_why(booted: ThreadedServer) -> None:
    assert "unsupported resource type 'pod'" in refused(vmo(booted, "ssh", f"pod/{NAME}"))


# --- expose ----------------------------------------------------------------------------------


def test_expose_vm_makes_a_service_that_reaches_the_guest(
    booted: ThreadedServer, capi: Api
) -> None:
    out = ok(
        vmo(
            booted,
            "expose",
            "vm",
            NAME,
            "--name",
            "vctl-db",
            "--port",
            "5432",
            "--type",
            "NodePort",
        )
    )
    assert out.strip() == f"Service vctl-db successfully created for vm {NAME}"
    service = capi.get(f"/api/v1/namespaces/{NS}/services/vctl-db").json()
    assert service["spec"]["selector"] == {"app": NAME}
    assert service["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachine"
    node_port = service["spec"]["ports"][0]["nodePort"]
    answer = wait_for(lambda: tcp_line("127.0.0.1", node_port), 60, "the NodePort")
    assert answer.startswith(f"vmo-guest {NAME}")


def test_expose_errors_name_what_failed(booted: ThreadedServer) -> None:
    assert "couldn't find port via --port flag or introspection" in refused(
        vmo(booted, "expose", "vmi", NAME, "--name", "noport")
    )
    assert "unknown service type: Bridge" in refused(
        vmo(booted, "expose", "vm", NAME, "--name", "x", "--port", "1", "--type", "Bridge")
    )
    assert (
        'error fetching VirtualMachine: virtualmachines.kubevirt.io "nosuch" not found'
        in refused(vmo(booted, "expose", "vm", "nosuch", "--name", "x", "--port", "1"))
    )


# --- pause, unpause, migrate-cancel, soft-reboot -----------------------------------------------


def test_pause_and_unpause_vm_and_vmi(booted: ThreadedServer, capi: Api) -> None:
    assert "Dry Run execution" in ok(vmo(booted, "pause", "vm", NAME, "--dry-run"))
    assert vmi_conditions(capi).get("Paused") != "True"
    assert ok(vmo(booted, "pause", "vm", NAME)).strip() == f"VMI {NAME} was scheduled to pause"
    wait_for(lambda: vmi_conditions(capi).get("Paused") == "True", 30, "the Paused condition")
    assert "VMI is already paused" in refused(vmo(booted, "pause", "vmi", NAME))
    assert ok(vmo(booted, "unpause", "vmi", NAME)).strip() == f"VMI {NAME} was scheduled to unpause"
    wait_for(lambda: vmi_conditions(capi).get("Paused") != "True", 30, "the guest running again")
    assert "VMI is not paused" in refused(vmo(booted, "unpause", "vm", NAME))
    assert "Error getting VirtualMachine nosuch" in refused(vmo(booted, "pause", "vm", "nosuch"))


def test_migrate_cancel_deletes_the_migration_in_flight(booted: ThreadedServer, capi: Api) -> None:
    assert f"Found no migration to cancel for {NAME}" in refused(
        vmo(booted, "migrate-cancel", NAME)
    )
    stuck = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "vctl-stuck"},
        # no node matches: the migration waits for a target and never ends by itself
        "spec": {"vmiName": NAME, "addedNodeSelector": {"vmo.test/none": "x"}},
    }
    assert capi.post(VMIM_PATH, stuck).status_code == 201
    assert "Dry Run execution" in ok(vmo(booted, "migrate-cancel", NAME, "--dry-run"))
    assert capi.get(f"{VMIM_PATH}/vctl-stuck").ok
    out = ok(vmo(booted, "migrate-cancel", NAME))
    assert out.strip() == f"VM {NAME} was scheduled to migrate-cancel"
    wait_for(lambda: capi.get(f"{VMIM_PATH}/vctl-stuck").status_code == 404, 30, "the deletion")


def test_soft_reboot_reboots_the_guest(booted: ThreadedServer, capi: Api) -> None:
    uid = (vmi_of(capi, NAME) or {})["metadata"]["uid"]
    out = ok(vmo(booted, "soft-reboot", NAME))
    assert out.strip() == f"VMI {NAME} was scheduled to soft-reboot"
    # the same VMI, its guest back up after the reboot
    wait_for(
        lambda: stdio_line(booted, f"vmi/{NAME}", 5432), BOOT_TIMEOUT, "the guest after reboot"
    )
    assert (vmi_of(capi, NAME) or {})["metadata"]["uid"] == uid


# --- who may: RBAC on the subresources ----------------------------------------------------------


def test_a_viewer_reads_guest_reports_and_may_not_start_or_pause(
    booted: ThreadedServer, capi: Api
) -> None:
    _, kubeconfig = make_user(booted, "vctl-viewer")
    Kubectl(booted.kubeconfig)(
        "create", "rolebinding", "vctl-viewer", "--clusterrole=view", "--user=vctl-viewer", "-n", NS
    )
    ok(vmo(booted, "guestosinfo", NAME, kubeconfig=kubeconfig))
    ok(vmo(booted, "userlist", NAME, kubeconfig=kubeconfig))
    error = refused(vmo(booted, "start", NAME, kubeconfig=kubeconfig))
    assert "Error starting VirtualMachine" in error and "forbidden" in error
    assert 'cannot update resource "virtualmachines/start"' in error
    assert "forbidden" in refused(vmo(booted, "pause", "vmi", NAME, kubeconfig=kubeconfig))
    assert "forbidden" in refused(
        vmo(booted, "expose", "vm", NAME, "--name=v", "--port=1", kubeconfig=kubeconfig)
    )


def test_a_user_without_a_role_may_not_read_guest_reports(booted: ThreadedServer) -> None:
    _, kubeconfig = make_user(booted, "vctl-nobody")
    error = refused(vmo(booted, "fslist", NAME, kubeconfig=kubeconfig))
    assert 'cannot get resource "virtualmachineinstances/filesystemlist"' in error


# --- start, stop, restart (last: they stop the shared guest) ------------------------------------


def test_start_of_a_running_vm_prints_the_servers_refusal(booted: ThreadedServer) -> None:
    error = refused(vmo(booted, "start", NAME))
    assert error.startswith("Error starting VirtualMachine") and "VM is already running" in error


def test_start_and_stop_of_a_missing_vm_name_it(booted: ThreadedServer) -> None:
    assert 'virtualmachines.kubevirt.io "nosuch" not found' in refused(
        vmo(booted, "start", "nosuch")
    )
    assert 'virtualmachines.kubevirt.io "nosuch" not found' in refused(
        vmo(booted, "stop", "nosuch")
    )


def test_stop_start_and_restart(booted: ThreadedServer, capi: Api) -> None:
    assert "Must both use --force=true and set --grace-period." in refused(
        vmo(booted, "stop", NAME, "--force")
    )
    assert "Dry Run execution" in ok(vmo(booted, "stop", NAME, "--dry-run"))
    assert run_strategy(capi) == "Always"
    assert ok(vmo(booted, "stop", NAME)).strip() == f"VM {NAME} was scheduled to stop"
    assert run_strategy(capi) == "Halted"
    wait_for(lambda: vmi_of(capi, NAME) is None, BOOT_TIMEOUT, "the VMI to go")
    assert "VM is not running" in refused(vmo(booted, "stop", NAME))
    assert "is not set to run" in refused(vmo(booted, "pause", "vm", NAME))

    assert "Dry Run execution" in ok(vmo(booted, "start", NAME, "--dry-run"))
    assert run_strategy(capi) == "Halted"
    assert ok(vmo(booted, "start", NAME)).strip() == f"VM {NAME} was scheduled to start"
    assert run_strategy(capi) == "Always"
    wait_running(capi, NAME)

    first = (vmi_of(capi, NAME) or {})["metadata"]["uid"]
    assert "only gracePeriod=0" in refused(
        vmo(booted, "restart", NAME, "--force", "--grace-period=5")
    )
    out = ok(vmo(booted, "restart", NAME, "--force", "--grace-period=0"))
    assert out.strip() == f"VM {NAME} was scheduled to restart"

    def restarted() -> bool:
        vmi = vmi_of(capi, NAME) or {}
        uid = vmi.get("metadata", {}).get("uid")
        return bool(uid) and uid != first and vmi.get("status", {}).get("phase") == "Running"

    wait_for(restarted, BOOT_TIMEOUT, "a new VMI running")


def test_start_paused_runs_not_one_guest_instruction_until_unpaused(
    booted: ThreadedServer, capi: Api
) -> None:
    k = Kubectl(booted.kubeconfig)
    ok(vmo(booted, "stop", NAME))
    wait_for(lambda: vmi_of(capi, NAME) is None, BOOT_TIMEOUT, "the VMI to go")
    assert ok(vmo(booted, "start", NAME, "--paused")).strip() == f"VM {NAME} was scheduled to start"
    wait_for(lambda: vmi_conditions(capi).get("Paused") == "True", BOOT_TIMEOUT, "a paused VMI")
    vmi = vmi_of(capi, NAME) or {}
    assert vmi["spec"]["startStrategy"] == "Paused" and vmi["status"]["phase"] == "Running"
    wait_for(
        lambda: capi.get(f"{VM_PATH}/{NAME}").json()["status"].get("printableStatus") == "Paused",
        30,
        "the VM printed as Paused",
    )
    (pod,) = k.json(
        "get", "pods", "-n", NS, "-l", f"kubevirt.io/created-by={vmi['metadata']['uid']}"
    )["items"]
    console = ["logs", pod["metadata"]["name"], "-n", NS, "-c", "guest-console-log"]
    time.sleep(3)  # a guest that ran would have printed its firmware's and kernel's lines by now
    assert k(*console).stdout == ""
    assert ok(vmo(booted, "unpause", "vm", NAME)).strip() == f"VMI {NAME} was scheduled to unpause"
    wait_for(lambda: stdio_line(booted, f"vmi/{NAME}", 5432), BOOT_TIMEOUT, "the guest booted")
    assert vmi_conditions(capi).get("Paused") != "True" and k(*console).stdout
