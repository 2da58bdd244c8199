"""The node agent's pieces that need no guest: its Node object and the KubeVirt CR override."""

from __future__ import annotations

import asyncio

from tests.conftest import Api
from vmo.client import Client
from vmo.engine.agent.agent import use_emulation_from_kubevirt
from vmo.engine.agent.node import AGENT_SOCKET_ANNOTATION, node_object
from vmo.engine.agent.runtime import workdir_name
from vmo.testing.apiserver import ThreadedServer


def test_node_object_is_schedulable_and_names_its_agent_socket() -> None:
    node = node_object("node-9", socket_path="/x/agent.sock", cpus=4, memory_ki=8 * 1024 * 1024)
    assert node["metadata"]["labels"]["kubevirt.io/schedulable"] == "true"
    assert node["metadata"]["annotations"][AGENT_SOCKET_ANNOTATION] == "/x/agent.sock"
    assert node["status"]["capacity"] == {
        "cpu": "4",
        "memory": f"{8 * 1024 * 1024}Ki",
        "pods": "110",
    }
    assert int(node["status"]["allocatable"]["memory"][:-2]) < 8 * 1024 * 1024
    assert node["status"]["conditions"][0]["type"] == "Ready"


def test_workdir_names_stay_short_and_distinct() -> None:
    a = workdir_name("virtual-machines", "x" * 200)
    b = workdir_name("other", "x" * 200)
    assert a != b and len(a) <= 33


def test_use_emulation_is_read_from_the_kubevirt_cr(apiserver: ThreadedServer, api: Api) -> None:
    async def read() -> bool | None:
        async with Client.from_kubeconfig(apiserver.kubeconfig) as client:
            return await use_emulation_from_kubevirt(client)

    assert asyncio.run(read()) is None
    cr = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "KubeVirt",
        "metadata": {"name": "kubevirt"},
        "spec": {"configuration": {"developerConfiguration": {"useEmulation": True}}},
    }
    r = api.post("/apis/kubevirt.io/v1/namespaces/kube-system/kubevirts", cr)
    assert r.status_code == 201, r.text
    try:
        assert asyncio.run(read()) is True
    finally:
        api.delete("/apis/kubevirt.io/v1/namespaces/kube-system/kubevirts/kubevirt")


def test_the_hybrid_example_is_what_vmo_demo_applies() -> None:
    from pathlib import Path

    import yaml

    from vmo.cli.demo import manifests

    shipped = list(
        yaml.safe_load_all((Path(__file__).parent.parent / "examples/hybrid-demo.yaml").read_text())
    )
    rendered = [
        {"apiVersion": res.api_version, "kind": res.kind, **obj}
        for res, obj in manifests("file:///root/.vmo/images/vmo-guest.qcow2")
    ]
    assert shipped == rendered
