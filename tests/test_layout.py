"""The layout: a reference that is the textbook, and an engine on top that only it imports."""
import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import npvae
from npvae.optim import Adam

PACKAGE = Path(npvae.__file__).parent
REFERENCE = ("layers", "distributions", "posteriors", "model", "hierarchical", "inference", "optim", "evaluate", "data")


def imported_modules(path):
    """Every module a file imports, resolved against the npvae package (relative imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "npvae" if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("name", REFERENCE)
def test_no_reference_file_imports_the_engine_or_what_exists_for_speed(name):
    path = PACKAGE / f"{name}.py"
    imports = imported_modules(path)
    assert not {m for m in imports if m == "npvae.engine" or m.startswith("npvae.engine.")}, imports
    assert not imports & {"npvae.train", "npvae.cli", "npvae.engine", "ctypes", "mmap", "scipy.linalg",
                          "scipy.linalg.blas", "multiprocessing", "threading"}, imports
    text = path.read_text()
    for word in ("openblas", "shared=", "replica", "bind_rows", "SplitBatch", "aligned"):
        assert word not in text, f"{path.name} mentions {word!r}"


def test_importing_the_reference_loads_no_engine_module():
    code = ("import sys; import npvae, npvae.model, npvae.hierarchical, npvae.inference, npvae.optim, npvae.evaluate, npvae.data, npvae.layers; "
            "print([m for m in sys.modules if m.startswith('npvae.engine')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_engine_imports_the_reference():
    imports = set().union(*(imported_modules(p) for p in (PACKAGE / "engine").glob("*.py")))
    assert {"npvae.model", "npvae.optim", "npvae.distributions", "npvae.evaluate"} <= imports


def test_adam_step_has_the_bias_corrected_moments_by_name():
    source = inspect.getsource(Adam.step)
    for name in ("m_hat", "v_hat", "beta1 ** t", "beta2 ** t"):
        assert name in source, name
