"""The SQLite store: resourceVersions, optimistic concurrency, history, compaction, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmo.apiserver import store as st


@pytest.fixture
def store(tmp_path: Path) -> st.Store:
    s = st.Store(tmp_path / "store.db")
    yield s
    s.close()


def cm(name: str, **data: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def test_resource_versions_are_global_and_monotonic(store: st.Store) -> None:
    rv1, _ = store.create("core/configmaps/a/x", cm("x"))
    rv2, _ = store.create("core/secrets/a/y", cm("y"))
    rv3, data = store.update("core/configmaps/a/x", cm("x", k="v"), expect_rv=rv1)
    assert rv1 < rv2 < rv3
    assert json.loads(data)["metadata"]["resourceVersion"] == str(rv3)


def test_stale_update_conflicts_and_writes_nothing(store: st.Store) -> None:
    rv1, _ = store.create("core/configmaps/a/x", cm("x"))
    store.update("core/configmaps/a/x", cm("x", k="1"), expect_rv=rv1)
    before = store.revision
    with pytest.raises(st.Conflict):
        store.update("core/configmaps/a/x", cm("x", k="2"), expect_rv=rv1)
    assert store.revision == before
    assert store.get("core/configmaps/a/x").obj()["data"] == {"k": "1"}


def test_duplicate_create_is_refused(store: st.Store) -> None:
    store.create("core/configmaps/a/x", cm("x"))
    with pytest.raises(st.AlreadyExists):
        store.create("core/configmaps/a/x", cm("x"))


def test_scan_is_a_prefix_range_with_paging(store: st.Store) -> None:
    for ns in ("a", "b"):
        for i in range(3):
            store.create(f"core/configmaps/{ns}/c{i}", cm(f"c{i}"))
    store.create("core/configmapsx/a/zz", cm("zz"))
    assert [r.key for r in store.scan("core/configmaps/a/")] == [
        "core/configmaps/a/c0",
        "core/configmaps/a/c1",
        "core/configmaps/a/c2",
    ]
    assert len(store.scan("core/configmaps/")) == 6
    page = store.scan("core/configmaps/", limit=4)
    rest = store.scan("core/configmaps/", start_after=page[-1].key)
    assert [r.key for r in page + rest] == [r.key for r in store.scan("core/configmaps/")]


def test_history_replays_in_order_and_compaction_expires_it(store: st.Store) -> None:
    rv0, _ = store.create("core/configmaps/a/x", cm("x"))
    store.update("core/configmaps/a/x", cm("x", k="1"), expect_rv=None)
    store.delete("core/configmaps/a/x")
    events = store.events_since(rv0, "core/configmaps/")
    assert [e.type for e in events] == [st.EventType.MODIFIED, st.EventType.DELETED]
    for i in range(10):
        store.create(f"core/configmaps/a/n{i}", cm(f"n{i}"))
    store.compact(keep=5)
    with pytest.raises(st.Compacted):
        store.events_since(rv0)
    assert len(store.events_since(store.revision - 5)) == 5


def test_compaction_keeps_the_database_bounded(tmp_path: Path) -> None:
    s = st.Store(tmp_path / "db")
    s.create("core/configmaps/a/x", cm("x", blob="y" * 2000))
    sizes = []
    for _round in range(5):
        for i in range(500):
            s.update("core/configmaps/a/x", cm("x", blob=str(i) * 2000), expect_rv=None)
        s.compact(keep=100)
        s.checkpoint()
        sizes.append((tmp_path / "db").stat().st_size)
    s.close()
    # SQLite reuses freed pages: once the first rounds have sized it, the file stops growing
    assert sizes[4] == sizes[2]


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "db"
    writer = textwrap.dedent(
        f"""
        import sys
        from vmo.apiserver.store import Store
        s = Store({str(db)!r})
        for i in range(200):
            s.create(f"core/configmaps/a/c{{i}}", {{"metadata": {{"name": f"c{{i}}"}}}})
            print(i, flush=True)
        sys.stdout.write("done\\n"); sys.stdout.flush()
        import time; time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acknowledged = -1
    for line in proc.stdout:
        if line.strip() == "done":
            break
        acknowledged = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    reopened = st.Store(db)
    assert reopened.count("core/configmaps/") == acknowledged + 1 == 200
    assert reopened.revision == 200
    rv, _ = reopened.create("core/configmaps/a/after", {"metadata": {"name": "after"}})
    assert rv == 201
    reopened.close()
