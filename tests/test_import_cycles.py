"""No module of VMO imports itself back through another (import-linter's contracts in
``.importlinter`` keep the layers; this keeps the graph acyclic below them)."""

from __future__ import annotations

import grimp


def _cycles() -> set[tuple[str, str]]:
    graph = grimp.build_graph("vmo", cache_dir=None)
    found = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            nested = module.startswith(imported + ".") or imported.startswith(module + ".")
            if not nested and graph.chain_exists(importer=imported, imported=module):
                found.add((min(module, imported), max(module, imported)))
    return found


def test_vmo_has_no_import_cycles() -> None:
    assert _cycles() == set()
