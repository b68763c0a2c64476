"""notebooks/*.ipynb: stored without outputs, each with a tagged install cell, and each executed top to bottom
(nbclient, install cells skipped) with a small step count, from a temporary folder outside the repository so the
model and data must come from the installed package. One notebook also runs against a wheel of the package
(not the checkout), which proves the bundled data ships inside it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]
SKIP_TAG = "skip-execution"  # nbclient's default skip tag


def test_every_headline_method_has_a_notebook():
    assert {"quickstart", "apt", "kasa", "imsm"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs_and_its_install_cell_is_skipped(name):
    book = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip the outputs before committing"
    install = [c for c in code if "%pip install" in c.source]
    assert len(install) == 1 and SKIP_TAG in install[0].metadata.get("tags", []), \
        "one install cell, tagged skip-execution"
    assert code.index(install[0]) == 0, "the install cell comes first"
    assert "git+https://github.com/your-org" not in "".join(c.source for c in code), "no placeholder repository"


def _execute(book: nbformat.NotebookNode | Path, cwd: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run a notebook (install cells skipped) in a fresh kernel whose working folder is cwd and whose environment
    adds env; returns it with its outputs."""
    from nbclient import NotebookClient

    if isinstance(book, Path):
        book = nbformat.read(book, as_version=4)
    old = dict(os.environ)
    os.environ.update(env)  # the kernel process inherits this environment
    try:
        NotebookClient(book, timeout=600, kernel_name="python3", skip_cells_with_tag=SKIP_TAG,
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return book


def _env(tmp_path: Path) -> dict[str, str]:
    return {"JAXPEFT_NOTEBOOK_STEPS": "6", "JAXPEFT_NOTEBOOK_EVAL_ROWS": "16", "JAX_PLATFORMS": "cpu",
            "JAXPEFT_NOTEBOOK_OUT": str(tmp_path / "runs"),
            "MPLBACKEND": "module://matplotlib_inline.backend_inline"}  # plots inline, whatever the caller set


@pytest.mark.slow
@pytest.mark.real_weights
@pytest.mark.parametrize("name", ["apt", "kasa", "imsm"])
def test_notebook_runs_top_to_bottom_outside_the_repository(name, tmp_path):
    book = _execute(ROOT / "notebooks" / f"{name}.ipynb", tmp_path, _env(tmp_path))
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook's plot did not render inline"


@pytest.mark.slow
@pytest.mark.real_weights
def test_quickstart_notebook_runs_from_a_wheel_of_the_package_not_the_checkout(tmp_path):
    """The package is built as a wheel and installed (without dependencies) into a folder that comes first on the
    kernel's path; the notebook then runs in a temporary folder: jaxpeft, its bundled data included, must come
    from that installed copy."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(next(wheels.glob("jaxpeft-*.whl")))], check=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {**_env(tmp_path), "PYTHONPATH": str(site)}
    probe = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import jaxpeft, jaxpeft.bundled; print(jaxpeft.__file__, jaxpeft.bundled.dataset_path('arithmetic'))")])
    where = "".join(o.get("text", "") for o in _execute(probe, work, env).cells[0].outputs)
    assert str(site) in where and str(ROOT) not in where, f"jaxpeft and its data came from {where}"
    book = _execute(ROOT / "notebooks" / "quickstart.ipynb", work, env)
    printed = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    assert "training rows" in printed and "after:" in printed
