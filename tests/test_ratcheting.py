"""Validation ratcheting: an object stored before a bound existed (put straight into the
store here, as an older, laxer release would have admitted it) can still have its status and
metadata written, while any new or changed invalid value is refused."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api
from vmo.api.kubevirt import default_vmi
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
MERGE = "application/merge-patch+json"


def stored_vmi(name: str, memory: str) -> JSON:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": f"uid-{name}",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "generation": 1,
        },
        "spec": {
            "domain": {
                "memory": {"guest": memory},
                "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
            },
            "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/x/y:1"}}],
        },
    }


@pytest.fixture
def legacy(apiserver: ThreadedServer, unique: str) -> str:
    """A VMI whose guest memory (1e400) admission refuses today."""

    async def inject() -> None:
        assert apiserver.server is not None
        key = f"kubevirt.io/virtualmachineinstances/default/{unique}"
        obj = stored_vmi(unique, "1e400")
        default_vmi(obj)  # as the older release stored it: defaulted, then admitted
        apiserver.server.store.create(key, obj)

    apiserver.call(inject())
    return f"/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances/{unique}"


def test_a_status_write_to_an_object_with_an_old_invalid_value_is_accepted(
    api: Api, legacy: str
) -> None:
    got = api.patch(legacy, {"status": {"phase": "Scheduling"}}, MERGE)
    assert got.status_code == 200, got.text
    assert got.json()["status"]["phase"] == "Scheduling"
    labelled = api.patch(legacy, {"metadata": {"labels": {"team": "db"}}}, MERGE)
    assert labelled.status_code == 200, labelled.text


def test_a_changed_invalid_value_is_still_refused(api: Api, legacy: str) -> None:
    got = api.patch(legacy, {"spec": {"domain": {"memory": {"guest": "1e500"}}}}, MERGE)
    assert got.status_code == 422, got.text
    assert "spec.domain.memory.guest" in got.text


def test_a_new_invalid_value_beside_an_old_one_is_refused(api: Api, legacy: str) -> None:
    got = api.patch(
        legacy, {"spec": {"domain": {"resources": {"requests": {"cpu": "1e400"}}}}}, MERGE
    )
    assert got.status_code == 422, got.text
    assert "requests[cpu]" in got.text or "requests.cpu" in got.text
