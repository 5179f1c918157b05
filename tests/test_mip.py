"""02_mip_select.py: the MIP meets its constraints and matches brute force, infeasible constraints name the binding
one, the assembled child loads with AutoModelForCausalLM, generates, and its block costs add up to its params."""

import argparse
import itertools
import json
import os
import random

import pytest
import torch
from _stage import run_stage
from test_bld import build_library
from test_costs import params_as_seconds

import common  # noqa: F401  (registers nemotron-nas)
from common import costs
from common.mip import blocks_of, greedy_blocks, solve_mip


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mip"))
    return root, build_library(root, **{"--num-seqs": 16, "--epochs": 1})


def mip_argv(root, out, *extra):
    return ["--library", os.path.join(root, "library"), "--out", out, "--batch", "2", "--prefill", "16",
            "--gen-len", "4", "--cost-repeats", "2", "--cost-layers", "2", "--cost-decode-steps", "2",
            "--speed-repeats", "1", "--eval-seqs", "2", "--eval-seq-len", "32", "--threads", "1",
            "--dtype", "float32", "--wandb-mode", "disabled", *extra]


def run_mip(root, out, *extra):
    """02_mip_select.py on the library under root, in this process; returns its globals."""
    return run_stage("02_mip_select.py", mip_argv(root, out, *extra))


def test_mip_meets_constraints_and_matches_brute_force():
    """One block (attention, FFN pair) per layer, scored as a pair; costs add over the pair's subblocks."""
    rng = random.Random(0)
    L, names = 3, {"attention": ["a0", "a1", "a2"], "ffn": ["f0", "f1", "f2"]}
    items = [(l, s, n) for l in range(L) for s in names for n in names[s]]
    blocks = [(l, a, f) for l in range(L) for a in names["attention"] for f in names["ffn"]]
    score = {b: rng.random() for b in blocks}  # not a sum of subblock scores
    cost_a = {it: rng.uniform(1, 5) for it in items}
    cost_b = {it: rng.uniform(1, 5) for it in items}
    cons = {"a": (cost_a, 1.0, 19.0), "b": (cost_b, 0.5, 19.0)}
    choice, status = solve_mip(score, cons, time_limit=20)
    assert status == "Optimal"
    chosen = [(l, s, n) for (l, s), n in choice.items()]
    for cost, const, budget in cons.values():
        assert sum(cost[i] for i in chosen) + const <= budget + 1e-6
    best = None
    per_layer = [[b for b in blocks if b[0] == l] for l in range(L)]
    for combo in itertools.product(*per_layer):
        sub = [(l, "attention", a) for l, a, _ in combo] + [(l, "ffn", f) for l, _, f in combo]
        if all(sum(c[i] for i in sub) + k <= b for c, k, b in cons.values()):
            v = sum(score[b] for b in combo)
            best = v if best is None else min(best, v)
    assert best is not None and sum(score[b] for b in blocks_of(choice)) == pytest.approx(best, abs=1e-6)
    # a second, diverse solution differs in at least min_hamming layers' blocks
    second, _ = solve_mip(score, cons, 20, exclude=[choice], min_hamming=2)
    assert sum(a != b for a, b in zip(blocks_of(choice), blocks_of(second))) >= 2


def test_mip_removes_whole_layers_when_the_block_score_says_so():
    """Pair scores where removing a whole layer costs less than the sum of its parts: the MIP removes a layer,
    which a sum of subblock scores would have ruled out."""
    L, names = 2, {"attention": ["attn", "no_op"], "ffn": ["ffn", "no_op"]}
    blocks = [(l, a, f) for l in range(L) for a in names["attention"] for f in names["ffn"]]
    score = {b: 0.0 if b[1:] == ("attn", "ffn") else 1.0 for b in blocks}
    score[(0, "no_op", "no_op")] = 2.5  # layer 0: the parts add up (about)
    score[(1, "no_op", "no_op")] = 1.2  # layer 1: less than attention-only (1.0) + FFN-only (1.0) removal
    rt = {(l, s, n): (0.0 if n == "no_op" else 1.0) for l in range(L) for s in names for n in names[s]}
    choice, _ = solve_mip(score, {"runtime": (rt, 0.0, 2.0)}, 20)  # must drop two subblocks' runtime
    assert blocks_of(choice) == [(0, "attn", "ffn"), (1, "no_op", "no_op")]


def test_greedy_spends_the_budget_the_equal_shares_leave():
    """Greedy per layer, then upgrades by score saved per second while one fits: it ends within the budget and
    no single remaining upgrade fits (it does not stop far below the target like equal shares alone)."""
    rng = random.Random(1)
    L, names = 4, {"attention": ["a0", "a1", "no_op"], "ffn": ["f0", "f1", "no_op"]}
    blocks = [(l, a, f) for l in range(L) for a in names["attention"] for f in names["ffn"]]
    rt = {b: (b[1] != "no_op") * (2.0 if b[1] == "a0" else 1.0) + (b[2] != "no_op") * (1.5 if b[2] == "f0" else 0.7)
          for b in blocks}
    score = {b: (0.0 if b[1:] == ("a0", "f0") else rng.uniform(0.1, 1.0) * (4.0 - rt[b])) for b in blocks}
    budget = 9.0
    choice = greedy_blocks(score, rt, budget)
    pick = blocks_of(choice)
    used = sum(rt[b] for b in pick)
    assert used <= budget + 1e-9
    left = budget - used
    assert not any(score[b] < score[pick[b[0]]] and rt[b] - rt[pick[b[0]]] <= left for b in blocks)
    assert used > budget - 2.0  # the shares alone (9/4 per layer) would leave more unspent


def test_infeasible_constraints_name_the_binding_one(lib, monkeypatch, tmp_path):
    # noiseless timings: on a shared CPU a tiny model's measured costs can be negative (never clipped), and then
    # any speedup looks feasible; their cost cache goes to tmp_path, away from the other tests' run directory
    monkeypatch.setattr(costs, "scenario_seconds", params_as_seconds)
    root, _ = lib
    out = os.path.join(root, "child_infeasible")
    with pytest.raises(SystemExit) as e:
        run_mip(root, out, "--max-params", "0.9", "--min-speedup", "1000", "--run-dir", str(tmp_path))
    err = str(e.value.code)  # sys.exit("error: ..."): printed at exit, exit status 1
    assert err.startswith("error: ") and "\n" not in err
    assert "min_speedup is binding" in err and "tightest feasible value is --min-speedup" in err
    assert not os.path.exists(out)


def test_stock_vllm_restriction_keeps_only_blocks_stock_vllm_serves(lib):
    """--serving stock-vllm: at a KV-memory budget where the unrestricted child uses linear attention, the
    restricted child has no linear subblock and no no-op attention in layer 0, still meets the budget, and says it
    needs no plugin; the unrestricted child names the subblocks that need the plugin."""
    from common.puzzle import stock_vllm_serves

    root, _ = lib
    searches = {}
    for serving in ("any", "stock-vllm"):
        out = os.path.join(root, f"child_{serving}")
        run_mip(root, out, "--max-memory-gib", "0.02", "--kv-tokens", "100000", "--no-baselines",
                "--serving", serving, "--metrics-name", f"mip_{serving}")  # KV memory binds: attention goes
        with open(os.path.join(out, "search.json")) as f:
            searches[serving] = json.load(f)
    library = json.load(open(os.path.join(root, "library", "library.json")))
    config = {(e["layer"], e["subblock"], e["name"]): e["config"] for e in library["variants"]}
    free, stock = searches["any"], searches["stock-vllm"]
    assert free["serving"]["needs_plugin"] and not free["serving"]["stock_vllm"]  # the budget needs linear blocks
    for b in stock["solution"]:
        for s in ("attention", "ffn"):
            assert stock_vllm_serves(b["layer"], s, config[(b["layer"], s, b[s])]), b
            assert not config[(b["layer"], s, b[s])]["replace_with_linear"]
    assert stock["solution"][0]["attention"] != "no_op"
    assert stock["serving"] == {"restricted_to": "stock-vllm", "stock_vllm": True, "needs_plugin": [],
                                "not_served_by_vllm": []}
    assert stock["predicted"]["memory_bytes"] <= stock["constraints"]["max_memory"]
    assert stock["predicted"]["score"] > free["predicted"]["score"]  # a smaller search space: no better optimum


def test_rescoring_in_the_childs_context_keeps_the_constraints(lib):
    """--rescore-rounds: the child and the other score's baseline are each solved again on scores taken in their
    own context; every round is recorded, the child still meets its budget."""
    root, _ = lib
    out = os.path.join(root, "child_rescored")
    run_mip(root, out, "--max-params", "0.5", "--rescore-rounds", "2", "--metrics-name", "mip_rescored")
    with open(os.path.join(out, "search.json")) as f:
        search = json.load(f)
    assert set(search["rescore_rounds"]) == {"kl", "lm_loss"}
    for score, r in search["rescore_rounds"].items():
        rounds, key = r["rounds"], ("kl" if score == "kl" else "lm_loss")
        assert rounds[0]["round"] == 0 and 1 <= len(rounds) <= 3 and all(x["kl"] > 0 for x in rounds)
        assert len(rounds) == 3 or rounds[-1]["changed_subblocks"] == 0  # stops early only at a fixed point
        assert rounds[r["kept_round"]][key] == min(x[key] for x in rounds)  # the best child measured is kept
    assert max(len(r["rounds"]) for r in search["rescore_rounds"].values()) > 1  # a solution moved at least once
    assert search["measured"]["params"] <= search["constraints"]["max_params"]
    assert search["measured"]["method"] == "MIP (KL score, rescored)"
    assert any(b["method"] == "MIP (LM-loss score, rescored)" for b in search["baselines"])


def test_assembled_child_loads_generates_and_costs_add_up(lib):
    from transformers import AutoModelForCausalLM
    root, _ = lib
    out = os.path.join(root, "child")
    run_mip(root, out, "--max-params", "0.8", "--sweep", "1.1,1.3", "--num-solutions", "2")
    with open(os.path.join(out, "search.json")) as f:
        search = json.load(f)
    child = AutoModelForCausalLM.from_pretrained(out)
    n = sum(p.numel() for p in child.parameters())
    assert search["predicted"]["params"] == n == search["measured"]["params"]
    assert n <= search["constraints"]["max_params"]
    assert {"predicted_speedup", "measured_speedup", "baselines", "sweep"} <= set(search)
    assert len(search["solutions"]) == 2
    report = "\n".join(json.load(open(os.path.join(root, "metrics", "mip.json")))["report"])
    assert report.startswith("## 02 Puzzle search: mip") and "Pareto sweep (min-speedup targets):" in report
    methods = [b["method"] for b in search["baselines"]]
    assert any("greedy" in m for m in methods) and any("init-only" in m for m in methods)
    assert os.path.exists(os.path.join(out, "pareto.png"))
    ids = torch.tensor([[5, 6, 7]])
    gen = child.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)
    with pytest.raises(SystemExit):  # never overwrites a finished child
        run_mip(root, out, "--max-params", "0.8")


# ----------------------------------------------------------------------------
# Window variants: KV memory by the window rule, so a long-context memory budget buys windows


@pytest.fixture(scope="module")
def window_lib(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mip_window"))
    return root, build_library(root, **{"--num-seqs": 16, "--epochs": 1, "--window-sizes": "4,8", "--kv-heads": "",
                                        "--ffn-widths": ""})


def stage_args(monkeypatch, tmp_path, *flags):
    """02's args as the stage completes them (the scenario preset filled in), from a run that passes the flag checks
    and stops at the first file check: --library names nothing."""
    parse, parsed = argparse.ArgumentParser.parse_args, []

    def parse_and_keep(self, *a, **kw):
        parsed.append(parse(self, *a, **kw))
        return parsed[-1]
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_keep)
    with pytest.raises(SystemExit, match="block library .* does not exist"):
        run_stage("02_mip_select.py", ["--library", str(tmp_path / "l"), "--out", str(tmp_path / "o"), "--max-params",
                                       "0.9", *flags])
    return parsed[-1]


def test_scenario_presets_fill_what_the_flags_leave_unset(monkeypatch, tmp_path):
    args = stage_args(monkeypatch, tmp_path, "--scenario", "long", "--batch", "2")
    assert (args.scenario, args.batch, args.prefill, args.gen_len) == ("long", 2, 1024, 256)
    args = stage_args(monkeypatch, tmp_path)
    assert (args.scenario, args.batch, args.prefill, args.gen_len) == ("short", 8, 128, 64)


def test_long_context_memory_budget_picks_windows_counted_by_the_window_rule(window_lib):
    """100,000 cached tokens per sequence: the parent's KV cache is ~50x its weights, and a budget of the weights +
    30 MB leaves room for at most one full-attention layer. The MIP fills the others with windows (cheaper in KL than
    linear or no-op attention here), and the child's predicted memory is its weights plus a KV cache where each window
    layer holds min(100000, W) positions per sequence, computed again from the saved child's config."""
    from transformers import AutoModelForCausalLM

    from common.checkpoint import load_checkpoint
    from common.variants import kv_cache_bytes

    root, _ = window_lib
    parent, _ = load_checkpoint(os.path.join(root, "parent"))
    weights = 2 * sum(p.numel() for p in parent.parameters())
    budget = weights + 30e6
    out = os.path.join(root, "child_long")
    run_mip(root, out, "--max-memory-gib", str(budget / 2 ** 30), "--kv-tokens", "200000",
            "--no-baselines", "--cost-check", "0", "--metrics-name", "mip_window")
    with open(os.path.join(out, "search.json")) as f:
        search = json.load(f)
    attention = [b["attention"] for b in search["solution"]]
    assert sum(a == "kv2" for a in attention) <= 1
    assert sum(a.startswith("kv2-win") for a in attention) >= 3, attention
    child = AutoModelForCausalLM.from_pretrained(out)
    assert [b.attention.window_length for b in child.config.block_configs] == [
        int(a.split("win")[1]) if "win" in a else None for a in attention]
    want = 2 * sum(p.numel() for p in child.parameters()) + kv_cache_bytes(child.config, 2, 100000, "bf16")
    assert search["predicted"]["memory_bytes"] == pytest.approx(want, rel=1e-12) and want <= budget
    assert search["serving"]["needs_plugin"] and not search["serving"]["not_served_by_vllm"]  # windows: the plugin


def test_exclude_kinds_window_searches_the_same_space_without_windows(window_lib):
    """The same long-context memory budget with --exclude-kinds window: no layer gets a window, so the layers that
    must shed KV memory take linear or no-op attention instead (the 'best child without windows' of issue #26), and
    a kind that would remove the parent's own block is refused."""
    from common.checkpoint import load_checkpoint

    root, _ = window_lib
    parent_weights = 2 * sum(p.numel() for p in load_checkpoint(os.path.join(root, "parent"))[0].parameters())
    out = os.path.join(root, "child_long_nowin")
    run_mip(root, out, "--max-memory-gib", str((parent_weights + 30e6) / 2 ** 30), "--kv-tokens", "200000",
            "--no-baselines", "--cost-check", "0", "--exclude-kinds", "window",
            "--metrics-name", "mip_window_excluded")
    with open(os.path.join(out, "search.json")) as f:
        attention = [b["attention"] for b in json.load(f)["solution"]]
    assert not any("win" in a for a in attention), attention
    assert sum(a == "kv2" for a in attention) <= 1
    with pytest.raises(SystemExit, match="--exclude-kinds: unknown kind"):  # checked before any file is read
        run_stage("02_mip_select.py", ["--library", "l", "--out", "o", "--exclude-kinds", "gqa"])


def test_kv_dtype_fp8_spends_the_saved_memory_and_the_child_runs_an_fp8_cache(window_lib):
    """The same budget as the bf16 test above (weights + 30 MB at 100,000 cached tokens per sequence, where one
    full-attention layer's bf16 KV is 25.6 MB): with --kv-dtype fp8 a full layer's KV is half that, so the MIP keeps
    two full-attention layers instead of one; the saved child runs an FP8 KV cache with calibrated per-layer scales
    (its KL includes the rounding), and its predicted memory is its weights + the FP8 KV by the window rule."""
    from common.checkpoint import load_checkpoint
    from common.variants import kv_cache_bytes

    root, _ = window_lib
    parent, _ = load_checkpoint(os.path.join(root, "parent"))
    budget = 2 * sum(p.numel() for p in parent.parameters()) + 30e6
    out = os.path.join(root, "child_long_fp8")
    run_mip(root, out, "--max-memory-gib", str(budget / 2 ** 30), "--kv-tokens", "200000", "--kv-dtype",
            "fp8", "--no-baselines", "--cost-check", "0", "--metrics-name", "mip_window_fp8")
    with open(os.path.join(out, "search.json")) as f:
        search = json.load(f)
    attention = [b["attention"] for b in search["solution"]]
    assert sum(a == "kv2" for a in attention) >= 2, attention
    child, _ = load_checkpoint(out)
    assert child.config.kv_cache_dtype == "fp8"
    attn = [layer.self_attn for layer in child.model.layers if getattr(layer, "self_attn", None) is not None
            and hasattr(layer.self_attn, "k_scale")]
    assert attn and all(float(m.k_scale) > 0 and float(m.v_scale) > 0 and float(m.k_scale) != 1.0 for m in attn)
    want = 2 * sum(p.numel() for p in child.parameters()) + kv_cache_bytes(child.config, 2, 100000, "fp8")
    assert search["predicted"]["memory_bytes"] == pytest.approx(want, rel=1e-12) and want <= budget
