"""notebooks/inspect_checkpoint.ipynb runs top to bottom on a tiny distillation run that the test makes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import run_stage
from fdlight.diagnostics.loading import read_loss_curves

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_checkpoint.ipynb"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("nb") / "distill"
    run_stage(["data.num_train=64", "distill.batch_size=16", "distill.max_steps=4", "distill.epochs=1",
               "distill.log_every_n_steps=1"], run_dir)
    return run_dir


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec bound to this interpreter (the default 'python3' may point at another Python)."""
    prefix = tmp_path_factory.mktemp("kernel")
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", "fdlight-test"],
                   check=True, capture_output=True)
    return prefix / "share" / "jupyter"


def test_loss_curves_are_read_from_the_csv_logs(tiny_run):
    curves = read_loss_curves(tiny_run)
    assert [step for step, _ in curves["train/loss"]] == [0, 1, 2, 3]
    assert read_loss_curves(tiny_run / "student.safetensors") == curves


def test_notebook_runs_on_a_tiny_checkpoint(tiny_run, kernel, tmp_path, monkeypatch):
    """FDLIGHT_CHECKPOINT relative to the folder Jupyter was started in ($PWD), while the kernel runs elsewhere (in
    notebooks/ for `jupyter execute`; in an empty folder here)."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernel))
    monkeypatch.setenv("PWD", str(tiny_run.parent.parent))
    monkeypatch.setenv("FDLIGHT_CHECKPOINT", f"{tiny_run.parent.name}/{tiny_run.name}")
    monkeypatch.setenv("FDLIGHT_DIAGNOSE_OVERRIDES", "diagnose.num_images=8 diagnose.landscape.steps=3")
    kernel_dir = tmp_path / "notebooks"
    kernel_dir.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="fdlight-test", timeout=300,
                   resources={"metadata": {"path": str(kernel_dir)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 5  # loss curve, distances, diversity, maps, landscape
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"checkpoint: {tiny_run}" in text
    assert "4 logged train/loss values" in text
    summary = next(o for o in outputs if o.output_type == "execute_result")["data"]["text/plain"]
    assert "'landscape_loss': 'fd'" in summary and "attn_distance_spread" in summary
