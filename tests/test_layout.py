"""The house plan holds: the import-linter contracts of pyproject.toml are kept, a contract the code
breaks is reported as broken (so the check can fail), and no module imports one that imports it back,
counting imports under `if TYPE_CHECKING:` and inside functions (grimp reads every import statement
of the syntax tree, wherever it sits)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))
PACKAGES = ("memory_service", "trainer")


def lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-logo", "--no-cache", str(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=False, cache_dir=None)


def test_contracts_are_kept():
    result = lint(ROOT / "pyproject.toml")
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and " KEPT" in result.stdout


def test_a_contract_the_code_breaks_fails_the_check(tmp_path):
    # The shards do import storage (memory_service/shard/shard.py -> storage.store): forbidding it
    # must fail, or the check above proves nothing.
    config = tmp_path / "pyproject.toml"
    config.write_text("\n".join([
        "[tool.importlinter]",
        'root_packages = ["memory_service", "trainer"]',
        "[[tool.importlinter.contracts]]",
        'name = "deliberately broken: shards without storage"',
        'type = "forbidden"',
        'source_modules = ["memory_service.shard"]',
        'forbidden_modules = ["memory_service.storage"]',
    ]))
    result = lint(config)
    print(result.stdout)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "memory_service.shard" in result.stdout


def test_function_level_imports_are_in_the_graph(graph):
    # trainer/cli/operations.py imports the stats view inside `cmd_stats` only: the graph must see
    # it, or the cycle check below would miss circles hidden that way.
    assert graph.direct_import_exists(importer="trainer.cli.operations", imported="memory_service.ops.stats_view")


def test_no_module_imports_one_that_imports_it_back(graph):
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if graph.chain_exists(importer=imported, imported=importer):
                cycles.append(graph.find_shortest_chain(importer=imported, imported=importer))
    assert not cycles, "\n".join(" -> ".join(chain) for chain in cycles)
