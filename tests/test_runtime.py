"""The controller runtime (vmo.runtime): work queue, reconcile results, informers, status
helpers, leader election. Time is a FakeClock wherever a delay matters; informers and leases
run against the real embedded API server over HTTPS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vmo.client import CONFIGMAP, LEASE, Client, Credentials, Resource
from vmo.runtime import (
    ADDED,
    DELETED,
    MODIFIED,
    Backoff,
    Controller,
    FakeClock,
    Informer,
    Informers,
    LeaderElector,
    LeaseTiming,
    Manager,
    PermanentError,
    RateLimitedQueue,
    Result,
    Selector,
    TemporaryError,
    Watch,
    condition,
    merge_conditions,
    set_condition,
)
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]


async def settle(rounds: int = 5) -> None:
    """Lets the tasks woken by a clock step run."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def eventually(probe: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = probe()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.02)


# --- the fake clock -------------------------------------------------------------------------


async def test_fake_clock_wakes_sleepers_only_when_advanced_past_their_time() -> None:
    clock = FakeClock()
    woke: list[float] = []

    async def sleeper(seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(seconds)

    tasks = [asyncio.create_task(sleeper(s)) for s in (5.0, 1.0)]
    await settle()
    clock.advance(0.5)
    await settle()
    assert woke == []
    clock.advance(0.5)
    await settle()
    assert woke == [1.0]
    clock.advance(10)
    await settle()
    assert woke == [1.0, 5.0]
    await asyncio.gather(*tasks)
    assert clock.pending == 0


# --- the work queue -------------------------------------------------------------------------


async def test_queue_merges_a_key_added_twice_while_it_waits() -> None:
    queue = RateLimitedQueue(clock=FakeClock())
    for key in ("a", "b", "a"):
        queue.add(key)
    assert len(queue) == 2
    assert [await queue.get(), await queue.get()] == ["a", "b"]


async def test_queue_never_hands_a_key_to_two_workers_at_once() -> None:
    queue = RateLimitedQueue(clock=FakeClock())
    queue.add("a")
    assert await queue.get() == "a"
    queue.add("a")  # changed while a worker holds it
    second = asyncio.create_task(queue.get())
    await settle()
    assert not second.done() and len(queue) == 0
    queue.done("a")  # handed out again only now
    assert await asyncio.wait_for(second, 1) == "a"


async def test_queue_backoff_doubles_per_key_up_to_its_cap_and_forget_resets_it() -> None:
    clock = FakeClock()
    queue = RateLimitedQueue(clock=clock, backoff=Backoff(base=0.1, cap=0.5))
    delays = [queue.add_rate_limited("k") for _ in range(5)]
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert queue.add_rate_limited("other") == 0.1  # per key
    queue.forget("k")
    assert queue.add_rate_limited("k") == 0.1


async def test_a_rate_limited_key_comes_back_after_its_delay_not_before() -> None:
    clock = FakeClock()
    queue = RateLimitedQueue(clock=clock, backoff=Backoff(base=1.0, cap=8.0))
    queue.add_rate_limited("k")
    clock.advance(0.9)
    assert len(queue) == 0 and queue.waiting == {"k"}
    clock.advance(0.1)
    assert len(queue) == 1 and await queue.get() == "k"


async def test_add_after_keeps_the_earlier_of_two_delays() -> None:
    clock = FakeClock()
    queue = RateLimitedQueue(clock=clock)
    queue.add_after("k", 10)
    queue.add_after("k", 2)
    queue.add_after("k", 5)
    clock.advance(2)
    assert len(queue) == 1


async def test_shut_down_releases_every_waiting_worker() -> None:
    queue = RateLimitedQueue(clock=FakeClock())
    getters = [asyncio.create_task(queue.get()) for _ in range(3)]
    await settle()
    queue.shut_down()
    assert await asyncio.wait_for(asyncio.gather(*getters), 1) == [None, None, None]
    queue.add("late")
    assert len(queue) == 0


# --- reconcile results and errors -----------------------------------------------------------


class Scripted(Controller):
    """Each reconcile of a key pops its next outcome: a Result, None, or an exception."""

    name = "scripted"

    def __init__(self, client: Client, clock: FakeClock, script: dict[str, list[Any]]) -> None:
        super().__init__(
            client, informers=Informers(client, clock=clock), backoff=Backoff(1.0, 4.0)
        )
        self.script = script
        self.calls: list[str] = []

    def watches(self) -> Sequence[Watch]:
        return [Watch(CONFIGMAP)]

    async def reconcile(self, key: str) -> Result | None:
        self.calls.append(key)
        outcome = self.script[key].pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[no-any-return]


@pytest.fixture
def unused_client() -> Client:
    """A client that is never asked to connect (these tests drive ``process`` directly)."""
    return Client(Credentials(server="https://127.0.0.1:1"))


async def test_a_result_with_requeue_after_brings_the_key_back_then(
    unused_client: Client,
) -> None:
    clock = FakeClock()
    controller = Scripted(unused_client, clock, {"k": [Result.after(3), None]})
    await controller.process("k")
    assert controller.queue.waiting == {"k"}
    clock.advance(3)
    assert len(controller.queue) == 1


async def test_a_temporary_error_with_a_delay_is_retried_after_that_delay(
    unused_client: Client,
) -> None:
    clock = FakeClock()
    controller = Scripted(unused_client, clock, {"k": [TemporaryError("not yet", delay=7)]})
    await controller.process("k")
    clock.advance(6.9)
    assert len(controller.queue) == 0
    clock.advance(0.1)
    assert len(controller.queue) == 1
    assert controller.stats.last_errors["k"] == "not yet"


async def test_unexpected_errors_back_off_per_key_and_a_success_resets_the_backoff(
    unused_client: Client,
) -> None:
    clock = FakeClock()
    boom = RuntimeError("boom")
    script: dict[str, list[Any]] = {"k": [boom, boom, boom, None, boom]}
    controller = Scripted(unused_client, clock, script)
    for _ in range(3):
        await controller.process("k")
    assert controller.queue.failures("k") == 3  # delays 1, 2, 4
    await controller.process("k")
    assert controller.queue.failures("k") == 0 and "k" not in controller.stats.last_errors
    await controller.process("k")
    assert controller.queue.failures("k") == 1
    assert controller.stats.failures == 4


async def test_a_permanent_error_is_not_retried(unused_client: Client) -> None:
    clock = FakeClock()
    controller = Scripted(unused_client, clock, {"k": [PermanentError("bad spec")]})
    await controller.process("k")
    clock.advance(3600)
    assert len(controller.queue) == 0 and controller.queue.waiting == frozenset()
    assert controller.stats.permanent_failures == 1


# --- status helpers -------------------------------------------------------------------------


def test_a_condition_keeps_its_transition_time_while_its_status_stays() -> None:
    first = set_condition([], condition("Ready", False, "Starting"), "2026-01-01T00:00:00Z")
    later = set_condition(
        first, condition("Ready", False, "StillStarting", "slow"), "2026-01-01T00:05:00Z"
    )
    assert later[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert later[0]["reason"] == "StillStarting"
    flipped = set_condition(later, condition("Ready", True), "2026-01-01T00:09:00Z")
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:09:00Z"


def test_merging_conditions_keeps_order_times_and_optionally_the_others() -> None:
    old = [
        {**condition("A", True), "lastTransitionTime": "t0"},
        {**condition("B", True), "lastTransitionTime": "t0"},
    ]
    merged = merge_conditions(old, [condition("B", False), condition("A", True)], "t1")
    assert [(c["type"], c["lastTransitionTime"]) for c in merged] == [("B", "t1"), ("A", "t0")]
    kept = merge_conditions(old, [condition("C", True)], "t1", keep_others=True)
    assert [c["type"] for c in kept] == ["A", "B", "C"]


# --- informers against a real API server ----------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ThreadedServer]:
    """A server of this test's own, so it can be restarted and compacted."""
    server = ThreadedServer(tmp_path / "home").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def own_client(own_server: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(own_server.kubeconfig) as client:
        yield client
    await asyncio.sleep(0.1)  # let aiohttp close its TLS transports


def configmap(name: str, **data: str) -> JSON:
    return {"metadata": {"name": name, "namespace": "default"}, "data": data}


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, etype: str, obj: JSON) -> None:
        self.events.append((etype, obj["metadata"]["name"]))

    def saw(self, etype: str, name: str) -> bool:
        return (etype, name) in self.events


async def started(informer: Informer, handler: Recorder) -> int:
    handle = informer.add_handler(handler)
    await asyncio.wait_for(informer.wait_synced(), 10)
    return handle


async def test_an_informer_lists_then_follows_and_shares_its_cache(own_client: Client) -> None:
    await own_client.create(CONFIGMAP, configmap("before"))
    informers = Informers(own_client)
    informer = informers.get(Selector(CONFIGMAP, namespace="default"))
    first, second = Recorder(), Recorder()
    handle = await started(informer, first)
    assert first.saw(ADDED, "before")
    await own_client.create(CONFIGMAP, configmap("after"))
    await own_client.patch(CONFIGMAP, "before", {"data": {"x": "1"}}, "default")
    await own_client.delete(CONFIGMAP, "after", "default")
    await eventually(lambda: first.saw(DELETED, "after"))
    assert first.saw(ADDED, "after") and first.saw(MODIFIED, "before")
    assert informers.get(Selector(CONFIGMAP, namespace="default")) is informer
    handle2 = informer.add_handler(second)  # a late subscriber gets the cache replayed
    assert second.events == [(ADDED, "before")]
    assert informer.get("before", "default")["data"] == {"x": "1"}  # type: ignore[index]
    await informer.remove_handler(handle)
    assert informer.running
    await informer.remove_handler(handle2)
    assert not informer.running and informer.cache == {}


async def test_an_informer_resumes_after_an_api_server_restart_without_relisting(
    own_server: ThreadedServer, own_client: Client
) -> None:
    clock = FakeClock()
    informer = Informers(own_client, clock=clock).get(Selector(CONFIGMAP, namespace="default"))
    seen = Recorder()
    handle = await started(informer, seen)
    own_server.restart_apiserver()
    await own_client.create(CONFIGMAP, configmap("while-away"))
    for _ in range(50):  # it retries on the fake clock: move time until it reconnects
        clock.advance(1.0)
        await asyncio.sleep(0.05)
        if seen.saw(ADDED, "while-away"):
            break
    assert seen.saw(ADDED, "while-away")
    assert informer.relists == 1  # resumed from its resourceVersion
    await informer.remove_handler(handle)


async def test_an_informer_relists_on_410_and_reports_what_vanished_meanwhile(
    own_server: ThreadedServer, own_client: Client
) -> None:
    clock = FakeClock()
    await own_client.create(CONFIGMAP, configmap("doomed"))
    informer = Informers(own_client, clock=clock).get(Selector(CONFIGMAP, namespace="default"))
    seen = Recorder()
    handle = await started(informer, seen)
    stale = informer.resource_version

    async def churn_then_compact() -> None:
        await own_client.delete(CONFIGMAP, "doomed", "default")
        await own_client.create(CONFIGMAP, configmap("newcomer"))
        assert own_server.server is not None
        own_server.server.store.compact(keep=0)

    # the informer is kept away (on its fake-clock backoff) while history moves on
    own_server.restart_apiserver()
    await churn_then_compact()
    for _ in range(50):
        clock.advance(1.0)
        await asyncio.sleep(0.05)
        if informer.relists == 2 and seen.saw(DELETED, "doomed"):
            break
    assert informer.relists == 2, f"watch from {stale} should have been refused with 410"
    assert seen.saw(DELETED, "doomed") and seen.saw(ADDED, "newcomer")
    assert "default/doomed" not in informer.cache
    await informer.remove_handler(handle)


async def test_an_informer_outlives_a_failing_list(own_client: Client) -> None:
    """A list the server refuses (a kind it does not serve) is retried, never given up."""
    clock = FakeClock()
    missing = Resource("example.invalid", "v1", "nothings", "Nothing")
    informer = Informers(own_client, clock=clock).get(missing)
    handle = informer.add_handler(Recorder())
    for _ in range(5):
        await asyncio.sleep(0.1)
        clock.advance(20)
    assert informer.running and not informer.synced.is_set()
    await informer.remove_handler(handle)


# --- leader election ------------------------------------------------------------------------


def elector(client: Client, clock: FakeClock, identity: str, name: str) -> LeaderElector:
    return LeaderElector(
        client, name, "default", identity, timing=LeaseTiming(15, 10, 2), clock=clock
    )


async def test_only_one_of_two_replicas_holds_the_lease(
    apiserver: ThreadedServer, unique: str
) -> None:
    clock = FakeClock()
    async with Client.from_kubeconfig(apiserver.kubeconfig) as client:
        a, b = elector(client, clock, "a", unique), elector(client, clock, "b", unique)
        assert await a.try_acquire_or_renew()
        assert not await b.try_acquire_or_renew()
        clock.advance(5)
        assert await a.try_acquire_or_renew()  # renewed: b's view of the record changes
        assert not await b.try_acquire_or_renew()
        clock.advance(14)
        assert not await b.try_acquire_or_renew()  # only 14 s since b saw it renewed
        clock.advance(1)
        assert await b.try_acquire_or_renew()  # a stopped renewing 15 s ago
        lease = await client.get(LEASE, unique, "default")
        assert lease["spec"]["holderIdentity"] == "b"
        assert lease["spec"]["leaseTransitions"] == 1
        assert not await a.try_acquire_or_renew()
        assert not a.is_leader  # its last renewal is older than the renew deadline


async def test_a_manager_runs_its_controllers_only_while_it_leads(
    apiserver: ThreadedServer, unique: str
) -> None:
    clock = FakeClock()
    running: list[str] = []

    class Marker:
        def __init__(self, name: str) -> None:
            self.name = name

        async def run(self, stop: asyncio.Event) -> None:
            running.append(self.name)
            try:
                await stop.wait()
            finally:
                running.remove(self.name)

    async with Client.from_kubeconfig(apiserver.kubeconfig) as client:
        stop = asyncio.Event()
        first = Manager([Marker("first")], election=elector(client, clock, "first", unique))
        second = Manager([Marker("second")], election=elector(client, clock, "second", unique))
        task1 = asyncio.create_task(first.run(stop))
        await eventually(lambda: running == ["first"])
        task2 = asyncio.create_task(second.run(stop))
        assert second.election is not None
        election = second.election
        for _ in range(3):  # three of its attempts, each seeing the lease held by "first"
            before = election.attempts
            clock.advance(2)
            await eventually(lambda b=before: election.attempts > b)  # type: ignore[misc]
        assert running == ["first"] and not second.election.is_leader
        task1.cancel()  # the first replica stops: it gives its lease up on the way out
        await asyncio.gather(task1, return_exceptions=True)
        assert running == []
        assert (await client.get(LEASE, unique, "default"))["spec"]["holderIdentity"] == ""
        for _ in range(3):  # the second takes over at its next retry, not after 15 s
            clock.advance(2)
            await asyncio.sleep(0.1)
            if running:
                break
        assert running == ["second"]
        stop.set()
        await asyncio.wait_for(task2, 10)
        assert running == []


class Counting(Controller):
    name = "counting"

    def __init__(self, client: Client) -> None:
        super().__init__(client, informers=Informers(client))
        self.seen: list[str] = []

    def watches(self) -> Sequence[Watch]:
        return [Watch(Selector(CONFIGMAP, namespace="default"))]

    async def reconcile(self, key: str) -> Result | None:
        self.seen.append(key)
        return None


async def test_a_controller_run_again_after_it_stopped_still_reconciles(
    own_client: Client,
) -> None:
    """As a Manager does after a crash, or a replica that wins its Lease back."""
    controller = Counting(own_client)
    for round_ in (1, 2):
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        await own_client.create(CONFIGMAP, configmap(f"round-{round_}"))
        await eventually(lambda r=round_: f"default/round-{r}" in controller.seen)  # type: ignore[misc]
        stop.set()
        await asyncio.wait_for(task, 10)
