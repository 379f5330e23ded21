"""notebooks/quickstart.ipynb runs end to end (shortened to a few steps)."""

import pytest
from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.slow
def test_quickstart_notebook_executes(shared_data, monkeypatch):
    monkeypatch.setenv("JAXDP_QUICKSTART_STEPS", "2")
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO / "notebooks")}},
    )
    client.execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert '"steps": 2' in outputs
    assert "model.safetensors" in outputs
    # The plot renders inline (a library that switched matplotlib's backend would stop it).
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert images, "the plot cell produced no image"
