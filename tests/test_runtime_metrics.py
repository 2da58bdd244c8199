"""The controller runtime's metrics (vmo.runtime._metrics): what each reconcile result counts,
the duration histogram, and the queue depth of running controllers, as the process-wide
registry serves them. Each test names its controllers afresh: the registry outlives tests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vmo.client import Client, Credentials
from vmo.runtime import Controller as BaseController
from vmo.runtime import (
    FakeClock,
    Informers,
    PermanentError,
    Result,
    TemporaryError,
    Watch,
)

_names = itertools.count()


def fresh_name() -> str:
    return f"metrics-test-{next(_names)}"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def reconciles(controller: str, result: str) -> float:
    return sample("vmo_controller_reconcile_total", controller=controller, result=result)


def depth(controller: str) -> float | None:
    return REGISTRY.get_sample_value("vmo_controller_queue_depth", {"controller": controller})


class Scripted(BaseController):
    """Each reconcile pops its next outcome (a Result, None or an exception); a reconcile of a
    key in ``hold`` waits until ``release`` is set."""

    workers = 1

    def __init__(self, client: Client, name: str, script: list[Any] | None = None) -> None:
        super().__init__(client, informers=Informers(client, clock=FakeClock()))
        self.name = name
        self.script = list(script or [])
        self.hold: set[str] = set()
        self.release = asyncio.Event()
        self.started: list[str] = []

    def watches(self) -> Sequence[Watch]:
        return []  # keys come from the test

    async def reconcile(self, key: str) -> Result | None:
        self.started.append(key)
        if key in self.hold:
            await self.release.wait()
        outcome = self.script.pop(0) if self.script else None
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[no-any-return]


@pytest.fixture
def unused_client() -> Client:
    """A client that is never asked to connect (these controllers watch nothing)."""
    return Client(Credentials(server="https://127.0.0.1:1"))


async def test_a_successful_reconcile_counts_as_success_and_is_timed(
    unused_client: Client,
) -> None:
    name = fresh_name()
    await Scripted(unused_client, name, [None]).process("k")
    assert reconciles(name, "success") == 1
    assert reconciles(name, "error") == reconciles(name, "requeue") == 0
    assert sample("vmo_controller_reconcile_errors_total", controller=name) == 0
    assert sample("vmo_controller_reconcile_duration_seconds_count", controller=name) == 1


async def test_a_failing_reconcile_counts_as_an_error_in_both_families(
    unused_client: Client,
) -> None:
    name = fresh_name()
    controller = Scripted(unused_client, name, [RuntimeError("boom"), PermanentError("bad")])
    await controller.process("k")
    await controller.process("k")
    assert reconciles(name, "error") == 2
    assert sample("vmo_controller_reconcile_errors_total", controller=name) == 2
    assert reconciles(name, "success") == 0
    assert sample("vmo_controller_reconcile_duration_seconds_count", controller=name) == 2


async def test_a_reconcile_that_asks_to_come_back_counts_as_a_requeue_not_an_error(
    unused_client: Client,
) -> None:
    name = fresh_name()
    controller = Scripted(unused_client, name, [Result.after(5), TemporaryError("not yet")])
    await controller.process("k")
    await controller.process("k")
    assert reconciles(name, "requeue") == 2
    assert sample("vmo_controller_reconcile_errors_total", controller=name) == 0
    controller.queue.shut_down()  # drop the delays


async def test_the_queue_depth_follows_the_keys_waiting_while_the_controller_runs(
    unused_client: Client,
) -> None:
    name = fresh_name()
    controller = Scripted(unused_client, name)
    controller.hold.add("a")
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    for key in ("a", "b", "c"):
        controller.enqueue(key)
    await asyncio.wait_for(_until(lambda: controller.started == ["a"]), 5)
    assert depth(name) == 2  # a is held by the worker, b and c wait
    controller.release.set()
    await asyncio.wait_for(_until(lambda: len(controller.started) == 3), 5)
    assert depth(name) == 0
    assert reconciles(name, "success") == 3
    stop.set()
    await asyncio.wait_for(task, 10)
    assert depth(name) is None  # a stopped controller has no queue to report


async def test_controllers_per_node_have_series_of_their_own(unused_client: Client) -> None:
    base = fresh_name()
    one, two = Scripted(unused_client, f"{base}-node-1"), Scripted(unused_client, f"{base}-node-2")
    await one.process("k")
    await two.process("k")
    await two.process("k")
    assert reconciles(f"{base}-node-1", "success") == 1
    assert reconciles(f"{base}-node-2", "success") == 2


async def test_the_default_registry_serves_the_families_with_their_types(
    unused_client: Client,
) -> None:
    name = fresh_name()
    controller = Scripted(unused_client, name)
    controller.hold.add("a")
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    controller.enqueue("a")
    await asyncio.wait_for(_until(lambda: controller.started == ["a"]), 5)
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())
    }
    assert families["vmo_controller_queue_depth"].type == "gauge"
    assert families["vmo_controller_reconcile"].type == "counter"  # _total is the sample's
    assert families["vmo_controller_reconcile_errors"].type == "counter"
    assert families["vmo_controller_reconcile_duration_seconds"].type == "histogram"
    depths = {s.labels["controller"] for s in families["vmo_controller_queue_depth"].samples}
    assert name in depths
    controller.release.set()
    stop.set()
    await asyncio.wait_for(task, 10)


async def _until(probe: Any) -> None:
    while not probe():
        await asyncio.sleep(0.01)
