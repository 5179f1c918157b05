"""02_mip_select.py: the MIP meets its constraints and matches brute force, infeasible constraints name the binding
one, the assembled child loads with AutoModelForCausalLM, generates, and its block costs add up to its params."""

import importlib.util
import itertools
import json
import os
import random

import pytest
import torch
from conftest import ROOT
from test_bld import build_library

import common  # noqa: F401  (registers nemotron-nas)

spec = importlib.util.spec_from_file_location("mip", os.path.join(ROOT, "02_mip_select.py"))
mip = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mip)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mip"))
    return root, build_library(root, **{"--num-seqs": 16, "--epochs": 1})


def mip_argv(root, out, *extra):
    return ["--library", os.path.join(root, "library"), "--out", out, "--batch", "2", "--prefill", "16",
            "--gen-len", "4", "--cost-repeats", "2", "--cost-copies", "2", "--cost-decode-steps", "2",
            "--speed-repeats", "1", "--eval-seqs", "2", "--eval-seq-len", "32", "--threads", "1",
            "--speed-dtype", "float32", "--wandb-mode", "disabled", *extra]


def test_mip_meets_constraints_and_matches_brute_force():
    rng = random.Random(0)
    L, names = 3, {"attention": ["a0", "a1", "a2"], "ffn": ["f0", "f1", "f2"]}
    items = [(l, s, n) for l in range(L) for s in names for n in names[s]]
    score = {it: rng.random() for it in items}
    cost_a = {it: rng.uniform(1, 5) for it in items}
    cost_b = {it: rng.uniform(1, 5) for it in items}
    cons = {"a": (cost_a, 1.0, 19.0), "b": (cost_b, 0.5, 19.0)}
    choice, status = mip.solve_mip(items, L, score, cons, time_limit=20)
    assert status == "Optimal"
    chosen = [(l, s, n) for (l, s), n in choice.items()]
    for cost, const, budget in cons.values():
        assert sum(cost[i] for i in chosen) + const <= budget + 1e-6
    best = None
    per_slot = [[(l, s, n) for n in names[s]] for l in range(L) for s in names]
    for combo in itertools.product(*per_slot):
        if all(sum(c[i] for i in combo) + k <= b for c, k, b in cons.values()):
            v = sum(score[i] for i in combo)
            best = v if best is None else min(best, v)
    assert best is not None and sum(score[i] for i in chosen) == pytest.approx(best, abs=1e-6)
    # a second, diverse solution differs in at least min_hamming subblock choices
    second, _ = mip.solve_mip(items, L, score, cons, 20, exclude=[choice], min_hamming=2)
    assert sum(choice[k] != second[k] for k in choice) >= 2


def test_infeasible_constraints_name_the_binding_one(lib):
    root, _ = lib
    out = os.path.join(root, "child_infeasible")
    with pytest.raises(SystemExit) as e:
        mip.main(mip_argv(root, out, "--max-params", "0.9", "--min-speedup", "1000"))
    err = str(e.value.code)  # sys.exit("error: ..."): printed at exit, exit status 1
    assert err.startswith("error: ") and "\n" not in err
    assert "min_speedup is binding" in err and "tightest feasible value is --min-speedup" in err
    assert not os.path.exists(out)


def test_assembled_child_loads_generates_and_costs_add_up(lib):
    from transformers import AutoModelForCausalLM
    root, _ = lib
    out = os.path.join(root, "child")
    mip.main(mip_argv(root, out, "--max-params", "0.8", "--sweep", "1.1,1.3", "--num-solutions", "2"))
    with open(os.path.join(out, "search.json")) as f:
        search = json.load(f)
    child = AutoModelForCausalLM.from_pretrained(out)
    n = sum(p.numel() for p in child.parameters())
    assert search["predicted"]["params"] == n == search["measured"]["params"]
    assert n <= search["constraints"]["max_params"]
    assert {"predicted_speedup", "measured_speedup", "baselines", "sweep"} <= set(search)
    assert len(search["solutions"]) == 2
    methods = [b["method"] for b in search["baselines"]]
    assert any("greedy" in m for m in methods) and any("init-only" in m for m in methods)
    assert os.path.exists(os.path.join(out, "pareto.png"))
    ids = torch.tensor([[5, 6, 7]])
    gen = child.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)
    with pytest.raises(SystemExit):  # never overwrites a finished child
        mip.main(mip_argv(root, out, "--max-params", "0.8"))
