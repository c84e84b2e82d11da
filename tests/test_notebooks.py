"""Execute every walkthrough notebook in notebooks/ and check it shows its plots.

The notebooks run in a kernel started from this interpreter (the project's venv), through a
kernel spec written to a temporary folder, so no user-level Jupyter configuration or installed
kernel is used. They run with notebooks/ as the working directory, as a reader would run them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_ioi.ipynb", "02_induction.ipynb", "03_factual_recall.ipynb",
         "04_your_own_behavior.ipynb", "05_superposition.ipynb", "06_debugging.ipynb"]
KERNEL = "circuits-test-python"


def execute(path: Path, kernel_dir: Path, timeout: int = 600):
    """Run the notebook at `path` in a kernel on ``sys.executable``; return the executed copy."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = kernel_dir / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "circuits (test)",
        "language": "python",
    }))
    # Only our folder is searched, so the kernel is this interpreter whatever the user has set.
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
    manager = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, km=manager, timeout=timeout, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    finally:  # a kernel manager handed in is not the client's to stop: stop it here
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
    return nb


def outputs(nb, kind: str) -> list:
    """Every output of a code cell that carries the MIME type `kind`."""
    return [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if kind in out.get("data", {})]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_shows_plots(name: str, tmp_path: Path) -> None:
    nb = execute(NOTEBOOKS / name, tmp_path)
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert errors == []
    # Each walkthrough draws at least its heatmap or curve and the circuit diagram.
    assert len(outputs(nb, "image/png")) >= 2


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_outputs_and_is_small(name: str) -> None:
    path = NOTEBOOKS / name
    nb = json.loads(path.read_text(encoding="utf-8"))
    # Committed executed, so a reader sees the plots without running anything.
    images = [out for c in nb["cells"] if c["cell_type"] == "code"
              for out in c.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) >= 2
    assert path.stat().st_size < 1_000_000
