"""05_sft.py on a tiny model: the three-stage curriculum runs, lowers the loss, and writes a checkpoint + metrics."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_model, tiny_tokenizer

from common.checkpoint import load_checkpoint, save_checkpoint
from data_gen import build


def run_sft(tmp_path, *extra):
    init = tmp_path / "parent"
    if not init.exists():
        save_checkpoint(tiny_model(), tiny_tokenizer(), str(init), stage="parent")
        build.main(["--out", str(tmp_path / "data"), "--math", "60", "--science", "20", "--instructions", "20",
                    "--eval-math", "10", "--eval-instructions", "5"])
    cmd = [sys.executable, os.path.join(ROOT, "05_sft.py"), "--init", str(init), "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "sft"), "--seq-len", "128", "--batch-size", "2", "--grad-accum", "1",
           "--epochs", "2,1,1", "--lr", "3e-3,1e-3,1e-3", "--eval-problems", "0", "--toggle-problems", "6",
           "--wandb-mode", "disabled", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})


@pytest.mark.slow
def test_sft_curriculum_lowers_the_loss_and_saves(tmp_path):
    r = run_sft(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.load(open(tmp_path / "sft" / "meta.json"))
    hist = meta["history"]
    assert {h["stage"] for h in hist} == {1, 2, 3}
    first, last = hist[0]["loss"], min(h["loss"] for h in hist if h["stage"] == 1)
    assert last < 0.8 * first, (first, last)
    model, tok = load_checkpoint(str(tmp_path / "sft"))
    assert model.config.model_type == "nemotron-nas"
    metrics = json.load(open(tmp_path / "metrics" / "sft.json"))
    assert metrics["train_tokens"] > 0
    assert metrics["toggle"]["n"] == 6 and 0 <= metrics["toggle"]["think_rate_off"] <= 1
    assert "The toggle after SFT (first" in metrics["report"][-2] and metrics["report"][-2] in r.stdout  # stored, printed
    again = run_sft(tmp_path)  # a finished --out is never overwritten
    assert again.returncode != 0 and "already a finished checkpoint" in again.stderr


@pytest.mark.slow
def test_sft_without_toggle_data_fails_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    save_checkpoint(tiny_model(), tiny_tokenizer(), str(tmp_path / "parent"), stage="parent")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "05_sft.py"), "--init", str(tmp_path / "parent"),
                        "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "sft"), "--wandb-mode", "disabled"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error:")
