"""common/costs.py: block runtimes measured inside the full model. no_op costs exactly 0, a cost comes from paired
differences and is never clipped, the cache is never reused for another parent, and 02_mip_select.py checks its
cost model (parent + random children) and repeats the main child's measurement."""

import json
import os
import statistics

import pytest
import torch
from _stage import run_stage
from conftest import tiny_config, tiny_model
from test_bld import build_library

from common import costs
from common.model import num_params, parent_block
from common.puzzle import SUBBLOCKS, attention_variants, ffn_variants



def search_space(config):
    """The library's search space (as library.json stores it): attention kv2 (parent), kv1, linear, no_op;
    FFN w256 (parent), w... narrower, linear, no_op."""
    space = {"attention": attention_variants(config, [1]), "ffn": ffn_variants(config, [])}
    return {s: [{"name": v["name"], "config": v["config"].__dict__, "parent": v["parent"]} for v in space[s]]
            for s in SUBBLOCKS}


@pytest.fixture
def one_thread():
    """Time on one thread, as 02 --threads 1 does: two threads spin-wait each other on a shared CPU (~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_no_op_costs_exactly_zero_and_the_parent_is_predicted_as_measured(one_thread):
    model = tiny_model()
    space = search_space(model.config)
    c = costs.measure_block_runtimes(model, space, batch=1, prefill=8, gen_len=2, repeats=2, decode_steps=1)
    assert c["block_runtime_s"]["attention:no_op"] == 0.0 and c["block_runtime_s"]["ffn:no_op"] == 0.0
    assert set(c["block_runtime_s"]) == {f"{s}:{v['name']}" for s in SUBBLOCKS for v in space[s]}
    L = model.config.num_hidden_layers
    rt = c["block_runtime_s"]
    assert c["nonblock_runtime_s"] + L * (rt["attention:kv2"] + rt["ffn:w256"]) == pytest.approx(c["parent_runtime_s"])
    assert c["ceiling_runtime_s"] > 0 and c["ceiling_speedup"] > 0 and c["cost_layers"] == L - 1  # default: all but one


def fake_seconds(model):
    """Scenario seconds as a known function of the architecture: 10 s outside the blocks, per layer attention kv2
    3 s, kv1 -1 s (faster than no attention at all), linear 0.5 s; FFN w256 5 s, linear 0.25 s."""
    t = 10.0
    for b in model.config.block_configs:
        a, f = b.attention, b.ffn
        t += 0.0 if a.no_op else 0.5 if a.replace_with_linear else {2: 3.0, 4: -1.0}[a.n_heads_in_group]
        t += 0.0 if f.no_op else 0.25 if f.replace_with_linear else 5.0
    return t


@pytest.mark.parametrize("num_layers", [-1, 2])
def test_costs_are_paired_differences_and_never_clipped(monkeypatch, capsys, num_layers):
    def timed(models, batch, prefill, gen_len, repeats, decode_steps=None, per_round=False):
        times = [[fake_seconds(m) + 0.7 * r for r in range(repeats)] for m in models]  # the machine drifts
        return times if per_round else [statistics.median(t) for t in times]

    monkeypatch.setattr(costs, "scenario_seconds", timed)
    model = tiny_model()
    c = costs.measure_block_runtimes(model, search_space(model.config), 1, 8, 2, repeats=3, num_layers=num_layers)
    rt = c["block_runtime_s"]
    # parent variant: (t_parent - t_no_op) / k; the others: that + (t_v - t_parent) / k; the drift cancels
    assert rt["attention:kv2"] == pytest.approx(3.0) and rt["ffn:w256"] == pytest.approx(5.0)
    assert rt["attention:linear"] == pytest.approx(0.5) and rt["ffn:linear"] == pytest.approx(0.25)
    assert rt["attention:kv1"] == pytest.approx(-1.0)  # faster than the no_op baseline: negative, kept
    assert rt["attention:no_op"] == rt["ffn:no_op"] == 0.0
    assert "warning: runtime attention:kv1 is negative" in capsys.readouterr().out
    parent_s = 10.0 + 4 * (3.0 + 5.0) + 0.7  # median over rounds 0, 0.7, 1.4 of drift
    assert c["parent_runtime_s"] == pytest.approx(parent_s)
    assert c["nonblock_runtime_s"] == pytest.approx(10.7)
    assert c["ceiling_runtime_s"] == pytest.approx(10.7) and c["ceiling_speedup"] == pytest.approx(parent_s / 10.7)


def test_cost_cache_is_reused_only_for_the_same_parent_architecture(tmp_path):
    cfg = tiny_config()
    space = search_space(cfg)
    key = costs.cost_key(1, "b1-p8-g2", torch.float32, cfg, space)
    path = costs.cost_cache_path(str(tmp_path), key)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump({"key": key, "parent_runtime_s": 1.0}, f)
    same = costs.cost_key(1, "b1-p8-g2", torch.float32, tiny_config(), search_space(tiny_config()))
    assert costs.cost_cache_path(str(tmp_path), same) == path
    assert costs.read_cached_costs(path, same)["parent_runtime_s"] == 1.0
    wider = tiny_config(blocks=[parent_block(2, 12.0) for _ in range(4)])  # another parent: FFN 512
    for other in (costs.cost_key(1, "b1-p8-g2", torch.float32, wider, search_space(wider)),
                  costs.cost_key(1, "b1-p8-g2", torch.float32, tiny_config(vocab=256), space),
                  costs.cost_key(1, "b1-p8-g2", torch.bfloat16, cfg, space), dict(key, method="older-method")):
        assert other != key
        assert costs.read_cached_costs(path, other) is None  # not even when the file name would collide
        assert costs.read_cached_costs(costs.cost_cache_path(str(tmp_path), other), other) is None
    with open(path, "w") as f:  # an older cache format (no key): never reused
        json.dump({"block_runtime_s": {}, "parent_runtime_s": 1.0}, f)
    assert costs.read_cached_costs(path, key) is None


def params_as_seconds(models, batch, prefill, gen_len, repeats, decode_steps=None, per_round=False):
    """costs.scenario_seconds on a noiseless machine where a scenario takes 1 s plus 1 s per million parameters."""
    times = [[1.0 + num_params(m) * 1e-6] * repeats for m in models]
    return times if per_round else [statistics.median(t) for t in times]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("costs"))
    return root, build_library(root, **{"--num-seqs": 16, "--epochs": 1})


def test_search_json_holds_the_cost_check_and_the_repeat(lib, capsys, monkeypatch):
    """On a noiseless machine whose time adds up over blocks, the cost model predicts every child exactly."""
    monkeypatch.setattr(costs, "scenario_seconds", params_as_seconds)
    root, _ = lib
    argv = ["--library", os.path.join(root, "library"), "--batch", "1", "--prefill", "8", "--gen-len", "2",
            "--cost-repeats", "2", "--cost-decode-steps", "1", "--speed-repeats", "2", "--speed-decode-steps", "1",
            "--cost-check", "2", "--eval-seqs", "2", "--eval-seq-len", "16", "--threads", "1", "--dtype",
            "float32", "--max-params", "0.8", "--no-baselines", "--wandb-mode", "disabled"]
    run_stage("02_mip_select.py", argv + ["--out", os.path.join(root, "child")])
    with open(os.path.join(root, "child", "search.json")) as f:
        search = json.load(f)
    check = search["cost_check"]
    assert [r["method"] for r in check["rows"]] == ["parent", "random child 1", "random child 2"]
    assert check["rows"][0]["predicted_speedup"] == pytest.approx(1.0)  # the cost model reproduces the parent
    assert len({r["predicted_speedup"] for r in check["rows"]}) == 3
    for r in check["rows"] + [search["measured"], search["repeat"]]:
        assert r["measured_speedup_min"] <= r["measured_speedup"] <= r["measured_speedup_max"]
        assert r["speed_rounds"] == 2
        assert r["measured_speedup"] == pytest.approx(r["predicted_speedup"])
        assert r["prediction_error"] == pytest.approx(0.0, abs=1e-9)
        assert r["fraction_of_ceiling"] == pytest.approx(r["measured_speedup"] / search["ceiling_speedup"])
    assert check["max_abs_error"] == pytest.approx(0.0, abs=1e-9)
    s1, repeat = search["measured"]["measured_speedup"], search["repeat"]
    assert repeat["method"] == "MIP (repeat)" and repeat["method"] not in [b["method"] for b in search["baselines"]]
    assert repeat["agreement"] == pytest.approx(0.0, abs=1e-9) and s1 > 1
    ceiling_s = search["nonblock"]["runtime_s"]  # on this machine the non-block time is the model without blocks
    assert search["ceiling_runtime_s"] == pytest.approx(ceiling_s)
    assert search["ceiling_speedup"] == pytest.approx(search["parent"]["runtime_s"] / ceiling_s)
    assert search["costs_key"]["method"] == costs.COST_METHOD and len(search["costs_key"]["fingerprint"]) == 12
    assert "measuring block runtimes" in capsys.readouterr().out
    # a second child of the same parent on the same device and scenario reuses the measured costs
    run_stage("02_mip_select.py", argv + ["--out", os.path.join(root, "child_b"), "--metrics-name", "mip_b",
                                       "--cost-check", "0"])
    assert f"runtime costs from cache {search['costs_cache']}" in capsys.readouterr().out
    assert os.listdir(os.path.join(root, "costs")) == [os.path.basename(search["costs_cache"])]
