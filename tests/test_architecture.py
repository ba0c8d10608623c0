"""The package layout of docs/architecture.md, checked: imports go one way, low to high.

Every ``import`` / ``from ... import`` in moekit (module level or inside a function) and every
string naming a moekit module for a lazy import (``"moekit.lm.gpt_oss:GptOssAttention"``) is an
edge between two units: a folder under moekit/ or a top-level module. A unit may import only units
of a lower level; units of one level do not import each other. The known exceptions are listed
with the work that removes them; an exception that no longer occurs fails too, so the list shrinks.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moekit"

# Low to high; the same order as the table in docs/architecture.md.
LEVELS: list[set[str]] = [
    {"errors"},                                     # error types every folder raises and catches
    {"config_base", "files"},                       # the one config base; crash-safe file writes
    {"config"},                                     # MoEConfig and its parts
    {"router"},                                     # x_TD -> Routing
    {"balance"},                                    # losses of routing counts and scores
    {"ops"},                                        # kernels and custom ops, each with a reference and a benchmark
    {"dispatch", "experts"},                        # Routing -> DispatchPlan -> run -> combine; experts(x_RD, counts_E)
    {"stats"},                                      # routing statistics kept on the layer
    {"layer"},                                      # MoE: the one forward
    {"model_ops", "reference"},                     # whole-model helpers over MoE layers; float64 reference
    {"health", "replay", "adapters"},               # expert health checks; routing record and replay; LoRA
    {"lm"},                                         # the language model and every attention kind
    {"hf", "parallel"},                             # HF conversion; expert/data parallelism
    {"data", "report"},                             # corpora and tokenizers; plots and HTML reports
    {"train", "explain"},                           # the trainer; routing explanations
    {"recipes"},                                    # upcycling, BTX, surgery (use the trainer)
    {"serve"},                                      # inference engine and HTTP app
    {"__init__"},                                   # the package root re-exports the public API
    {"cli"},                                        # the command line
    {"__main__"},
]
LEVEL = {unit: i for i, units in enumerate(LEVELS) for unit in units}

# (importer, imported) -> why it is still there and what removes it.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}

_MODULE_STRING = re.compile(r"^moekit(\.[A-Za-z_][A-Za-z0-9_]*)+(:[A-Za-z_][A-Za-z0-9_]*)?$")


def _unit(module: str) -> str:
    """The unit of a dotted moekit module name: its folder or top-level module; names defined in
    moekit/__init__.py (``from moekit import __version__``) belong to the package root."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    name = parts[1]
    if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file():
        return name
    return "__init__"


def _is_module(module: str) -> bool:
    """Whether a dotted name is a moekit module or package on disk (not, e.g., a format name)."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _module_name(path: Path) -> tuple[str, str]:
    """(dotted module name, dotted package that relative imports start from)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        name = ".".join(parts[:-1])
        return name, name
    name = ".".join(parts)
    return name, name.rsplit(".", 1)[0]


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported moekit module, line) for every import statement and module-path string in ``path``."""
    _, package = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if node.module:
                found.append((module, node.lineno))
            else:  # from . import a, b: each name is a submodule (or a name of the package root)
                found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if _MODULE_STRING.match(node.value) and _is_module(node.value.split(":")[0]):
                found.append((node.value.split(":")[0], node.lineno))
    return [(module, line) for module, line in found if module.split(".")[0] == "moekit"]


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importer unit, imported unit) -> ["file:line", ...] over the whole package."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _unit(_module_name(path)[0])
        for module, line in _imports(path):
            target = _unit(module)
            if target != source:
                edges.setdefault((source, target), []).append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return edges


def test_every_unit_has_a_level():
    units = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    units |= {p.stem for p in PACKAGE.glob("*.py")}
    missing = sorted(units - set(LEVEL))
    assert not missing, (f"moekit units {missing} have no level: add each to LEVELS in tests/test_architecture.py "
                         f"and to the table in docs/architecture.md")


def test_imports_go_from_high_to_low():
    wrong = []
    for (source, target), where in sorted(_edges().items()):
        if source in LEVEL and target in LEVEL and LEVEL[source] <= LEVEL[target] \
                and (source, target) not in KNOWN_EXCEPTIONS:
            peer = "its peer" if LEVEL[source] == LEVEL[target] else "a higher level"
            wrong.append(f"{source} imports {target} ({peer}) at {', '.join(where)}")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def test_known_exceptions_still_occur():
    edges = _edges()
    gone = [pair for pair in KNOWN_EXCEPTIONS if pair not in edges]
    assert not gone, f"{gone} no longer import each other: remove them from KNOWN_EXCEPTIONS (and the doc)"


def test_lm_does_not_import_hf():
    """The case that started the rule: model code is in lm/, hf/ only converts."""
    lm_to_hf = _edges().get(("lm", "hf"))
    assert lm_to_hf is None, f"moekit.lm imports moekit.hf at {lm_to_hf}"


def test_the_checker_sees_lazy_and_string_imports(tmp_path):
    """The parser finds a function-level relative import and a registry string, not a docstring."""
    path = PACKAGE / "lm" / "config.py"
    found = {module for module, _ in _imports(path)}
    assert "moekit.lm.gpt_oss" in found and "moekit.config" in found
    export_py = PACKAGE / "hf" / "export.py"  # ``from ..lm.mla import ...`` inside a function
    assert "moekit.lm.mla" in {module for module, _ in _imports(export_py)}
    assert _unit("moekit.__version__") == "__init__" and _unit("moekit.hf.convert") == "hf"
    assert not _is_module("moekit.routing_record") and _is_module("moekit.lm.gpt_oss")
    assert LEVEL["lm"] < LEVEL["hf"] and LEVEL["errors"] == 0


def test_one_checkpoint_error():
    import moekit
    from moekit.errors import CheckpointError
    from moekit.hf import CheckpointError as HFCheckpointError
    from moekit.hf import OutputFolderError
    from moekit.train import CheckpointError as TrainCheckpointError
    from moekit.errors import ChecksumError as ErrorsChecksumError
    from moekit.train.checkpoint import ChecksumError, DiskFullError

    assert ChecksumError is ErrorsChecksumError
    assert HFCheckpointError is TrainCheckpointError is moekit.CheckpointError is CheckpointError
    assert all(issubclass(cls, CheckpointError) for cls in (ChecksumError, DiskFullError, OutputFolderError))
    assert issubclass(CheckpointError, ValueError)
    defined = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
               if re.search(r"^class CheckpointError\b", p.read_text(encoding="utf-8"), re.M)]
    assert defined == ["moekit/errors.py"]


def test_plots_leave_matplotlib_state_alone():
    """Plots render without pyplot: the caller's backend stays and no figure is left open."""
    code = ("import sys, matplotlib; matplotlib.use('svg'); from moekit.report import plots; "
            "png = plots.loss_curves([{'name': 'a', 'evals': [{'step': 1, 'tokens': 8, 'loss': 2.0}]}], 'tokens'); "
            "assert png.startswith(b'\\x89PNG'), png[:8]; "
            "assert matplotlib.rcParams['backend'] == 'svg', matplotlib.rcParams['backend']; "
            "assert 'matplotlib.pyplot' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_version_is_written_once():
    import importlib.metadata

    import moekit

    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moekit.__version__"}
    try:
        installed = importlib.metadata.version("moekit")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("moekit is not installed (pip install -e .), so there is no installed version to compare")
    assert installed == moekit.__version__
