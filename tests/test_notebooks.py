"""The notebooks run top to bottom (with small settings) against the shipped GHNs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SMALL = {
    "compare_init.ipynb": "VIT_STEPS = 3\nGPT_STEPS = 3\nEVAL_BATCHES = 1",
    "predict_custom_model.ipynb": "STEPS = 3\nEVAL_BATCHES = 1",
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs_top_to_bottom(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "one cell tagged 'parameters'"
    params[0].source = SMALL[name]
    # Committed with the outputs of a full run: every code cell has run.
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(c.execution_count for c in committed.cells if c.cell_type == "code")
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert images, "the notebook shows its plots"
    text = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert "predicted" in text and "random" in text
