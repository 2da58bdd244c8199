"""``vmo storage``: what the pools of this host hold — per volume its virtual and real size, its
chain of layers and what stands on it (snapshots, linked clones), then every layer.

It reads the pools on disk under ``$VMO_HOME`` (each node's pool and the shared pool), as
``qemu-img info`` would: a host-local view for the embedded engine.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmo.cli._common import state_dir
from vmo.engine.storage.pool import Pool, qcow2_header


@dataclass(frozen=True)
class VolumeReport:
    pool: str
    volume: str  # namespace/name
    virtual_size: int
    real_size: int  # every layer of its chain, counted once per volume
    chain: list[str]  # layer files, top first
    snapshots: list[str]  # volume snapshots whose layer is in the chain
    dependents: list[str]  # other volumes sharing a layer of the chain (linked clones, parents)


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(size)


def pools_under(home: Path) -> dict[str, Pool]:
    """Pool label -> pool: the shared pool and every node's ``pool`` directory."""
    found: dict[str, Pool] = {}
    shared = home / "shared-pool"
    if shared.is_dir():
        found["shared"] = Pool(shared)
    for path in sorted(home.glob("**/pool")):
        if path.is_dir() and (path / ".layers").is_dir():
            found[path.parent.name] = Pool(path)
    return found


def report(pools: dict[str, Pool]) -> tuple[list[VolumeReport], list[dict[str, Any]]]:
    volumes: list[VolumeReport] = []
    layers: list[dict[str, Any]] = []
    for label, pool in pools.items():
        chains: dict[str, list[Path]] = {}
        for record in pool.volumes():
            if pool.exists(record.namespace, record.name):
                chains[f"{record.namespace}/{record.name}"] = pool.chain(
                    pool.path(record.namespace, record.name)
                )
        by_layer: dict[Path, set[str]] = {}
        for name, chain in chains.items():
            for layer in chain:
                by_layer.setdefault(layer, set()).add(name)
        snaps: dict[Path, list[str]] = {}
        for snap in pool.snapshots():
            snaps.setdefault(pool.snapshot_path(snap.namespace, snap.name), []).append(
                f"{snap.namespace}/{snap.name}"
            )
        for name, chain in chains.items():
            size, _ = qcow2_header(chain[0])
            others = sorted({v for layer in chain for v in by_layer[layer]} - {name})
            volumes.append(
                VolumeReport(
                    label, name, size, sum(layer.stat().st_blocks * 512 for layer in chain),
                    [layer.name for layer in chain],
                    sorted(s for layer in chain for s in snaps.get(layer, [])), others,
                )
            )  # fmt: skip
        for info in pool.layers():
            layers.append({"pool": label, **asdict(info)})
    return volumes, layers


def cmd_storage(args: argparse.Namespace) -> int:
    pools = pools_under(state_dir(args).root)
    volumes, layers = report(pools)
    if args.output == "json":
        print(json.dumps({"volumes": [asdict(v) for v in volumes], "layers": layers}, indent=1))
        return 0
    rows: list[tuple[str, ...]] = [
        ("POOL", "VOLUME", "VIRTUAL", "REAL", "CHAIN", "SNAPSHOTS", "SHARES LAYERS WITH")
    ]
    for v in volumes:
        rows.append(
            (v.pool, v.volume, human(v.virtual_size), human(v.real_size), str(len(v.chain)),
             str(len(v.snapshots)), ",".join(v.dependents) or "-")
        )  # fmt: skip
    _table(rows)
    if args.layers:
        print()
        rows = [("POOL", "LAYER", "REAL", "BACKING", "TOP OF", "SNAPSHOTS", "DEPENDENTS")]
        for layer in layers:
            rows.append(
                (layer["pool"], layer["name"][:12], human(layer["real_size"]),
                 (layer["backing"] or "-")[:12], ",".join(layer["volumes"]) or "-",
                 ",".join(layer["snapshots"]) or "-", str(len(layer["children"])))
            )  # fmt: skip
        _table(rows)
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def register(sub: Any) -> None:
    cmd = sub.add_parser(
        "storage", help="volumes of this host's pools: sizes, layer chains, snapshots, dependents"
    )
    cmd.add_argument("-o", "--output", choices=("table", "json"), default="table")
    cmd.add_argument("--layers", action="store_true", help="also list every layer")
    cmd.set_defaults(func=cmd_storage)
