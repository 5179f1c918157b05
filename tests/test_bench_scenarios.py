"""benchmarks/bench_scenarios.py: every model against the parent in each scenario, memory by the window rule."""

import importlib.util
import json
import os

import pytest

from common.checkpoint import save_checkpoint
from common.model import AttentionConfig, BlockConfig, FFNConfig
from conftest import ROOT, tiny_model, tiny_tokenizer

_spec = importlib.util.spec_from_file_location("bench_scenarios", os.path.join(ROOT, "benchmarks", "bench_scenarios.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

W = 8


def window_blocks(layers, num_layers=4):
    return [BlockConfig(AttentionConfig(n_heads_in_group=2, window_length=W if i in layers else None),
                        FFNConfig(ffn_mult=6.0)) for i in range(num_layers)]


def test_each_model_timed_against_the_parent_with_window_rule_memory(tmp_path):
    tok = tiny_tokenizer()
    save_checkpoint(tiny_model(seed=0), tok, str(tmp_path / "parent"), stage="parent")
    save_checkpoint(tiny_model(seed=0, blocks=window_blocks({1, 2, 3})), tok, str(tmp_path / "win"), stage="test")
    out = tmp_path / "scenarios.json"
    bench.main(["--run-dir", str(tmp_path), "--models", "win", "--scenarios", "short", "--rounds", "2",
                "--decode-steps", "2", "--dtype", "float32", "--threads", "1", "--out", str(out)])
    r = json.loads(out.read_text())["scenarios"]["short"]
    parent, win = r["models"]["parent"], r["models"]["win"]
    assert parent["speedup"] == 1.0 and len(win["rounds_s"]) == 2 and win["speedup_min"] <= win["speedup"]
    tokens = r["prefill"] + r["gen_len"]  # 192 per sequence; hidden 64, 4 heads, 2 KV heads: 32 K + 32 V values
    per_position = 2 * 32 * 2  # bf16 bytes per cached position of one layer
    assert parent["kv_gib"] * 2 ** 30 == r["batch"] * 4 * tokens * per_position
    assert win["kv_gib"] * 2 ** 30 == r["batch"] * (tokens + 3 * W) * per_position
    assert win["weights_gib"] == parent["weights_gib"]  # a window layer keeps the parent attention's weights


@pytest.mark.parametrize("argv", [["--scenarios", "medium"], ["--models", "parent"], ["--models", "a,a"]])
def test_bad_flags_exit_with_one_line(tmp_path, argv):
    base = {"--run-dir": str(tmp_path), "--models": "child"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    with pytest.raises(SystemExit) as e:
        bench.main([x for kv in base.items() for x in kv])
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)


@pytest.mark.slow
def test_quality_beside_speed_is_kl_to_the_parent_with_paired_gaps(tmp_path):
    """--scenarios none --eval-seq-len: KL to the parent (0 for the parent itself, > 0 for a window child at a length
    its window does not cover, 0 for a window that covers every chunk) and each pair's paired gap."""
    tok = tiny_tokenizer()
    save_checkpoint(tiny_model(seed=0), tok, str(tmp_path / "parent"), stage="parent")
    save_checkpoint(tiny_model(seed=0, blocks=window_blocks({1, 2, 3})), tok, str(tmp_path / "win"), stage="test")
    wide = [BlockConfig(AttentionConfig(n_heads_in_group=2, window_length=64), FFNConfig(ffn_mult=6.0))] * 4
    save_checkpoint(tiny_model(seed=0, blocks=wide), tok, str(tmp_path / "wide"), stage="test")
    out = tmp_path / "q.json"
    bench.main(["--run-dir", str(tmp_path), "--models", "win,wide", "--scenarios", "none", "--eval-seq-len", "32",
                "--eval-seqs", "4", "--threads", "1", "--out", str(out)])
    q = json.loads(out.read_text())["quality"]
    assert q["seq_len"] == 32 and q["num_seqs"] == 4 and "scenarios" not in q
    kl = {n: r["kl_parent"] for n, r in q["models"].items()}
    assert kl["parent"] == 0 and kl["win"] > 1e-4 and kl["wide"] < kl["win"] / 100  # W = 64 covers the 32 tokens
    g = q["paired"]["win - wide"]
    assert g["kl_parent"] == pytest.approx(kl["win"] - kl["wide"], abs=1e-9) and g["kl_parent_se"] >= 0
    with pytest.raises(SystemExit):
        bench.main(["--run-dir", str(tmp_path), "--models", "win", "--scenarios", "none"])
