"""Measured runtime costs for one serving scenario (Puzzle §4: the MIP's runtime constraint), used by 02_mip_select.py.

A serving scenario prefills `batch` prompts of `prefill` tokens, then decodes `gen_len` tokens with the KV cache.
Every timing is paired: the model and the parent run back to back in each round (ABAB..., every other round BA),
so a machine that speeds up or slows down moves both alike; a cost is the median over rounds of the difference.

Block costs are measured INSIDE THE FULL MODEL. For subblock s and variant v, v goes into k layers of a copy of
the parent (k = every layer but one by default; the weights are untrained, only the time matters):

    runtime[s:parent] = median(t_parent - t_no_op) / k          (s removed from those k layers)
    runtime[s:v]      = runtime[s:parent] + median(t_v - t_parent) / k
    runtime[s:no_op]  = 0,  non-block = t_parent - L * (runtime[attention:parent] + runtime[ffn:parent])

so the parent's predicted runtime is its measured one. Nothing is clipped: a variant measured faster than its
no_op keeps its negative cost (and a warning says so). The ceiling is the parent with every block removed
(embeddings, final norm, LM head): no child can be faster than it. A window variant (common/variants.py) is timed
with its real bounded cache: the model's forward gives its layers a WindowCacheLayer, so the decode steps timed at
the scenario's lengths read at most W + S - 1 cached positions (tests/test_window.py checks it).

Why: the earlier method timed a tiny stack (base block + k copies, vocab 8) and took differences of medians taken
at different moments. The tiny stack fits in cache while the real model streams its weights from memory, and the
unpaired differences were noisy (one FFN variant measured 716 and 1008 ms in two runs): predicted 1.5x children
measured 1.22-1.38x.
"""

import copy
import hashlib
import json
import os
import platform
import re
import statistics
import time

import torch

from common.checkpoint import read_json
from common.dist import print0, progress, sync
from common.puzzle import set_subblock
from common.variants import SUBBLOCKS, config_from_dict

COST_METHOD = "full-model-paired-v2"  # bump when the measurement changes: older caches are then never read
ARCH_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "hidden_act",
               "tie_word_embeddings", "rope_parameters", "attention_bias", "mlp_bias", "block_configs")

# Serving scenarios (02 --scenario, benchmarks/bench_scenarios.py): sequences x (prompt tokens + generated tokens)
SCENARIOS = {"short": {"batch": 8, "prefill": 128, "gen_len": 64},  # a small chat batch (run.sh's scenario)
             "long": {"batch": 8, "prefill": 1024, "gen_len": 256}}  # long context: the KV cache dominates memory

# ----------------------------------------------------------------------------
# Timing one serving scenario


@torch.no_grad()
def scenario_run(model, ids, gen_len, decode_steps):
    """Wall seconds of one prefill + gen_len greedy decode steps (decode_steps of them timed, scaled to gen_len)."""
    sync()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    sync()
    t1 = time.perf_counter()
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(decode_steps):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) + (t2 - t1) * gen_len / max(1, decode_steps)


def scenario_seconds(models, batch, prefill, gen_len, repeats, decode_steps=None, per_round=False):
    """Scenario seconds of each model in `models`, timed interleaved (ABAB..., every other round in reverse), so
    a machine that drifts in speed moves every model's timings alike. Returns each model's median, or with
    per_round=True each model's list of per-round seconds (round i of all models timed back to back)."""
    decode_steps = gen_len if decode_steps is None else min(decode_steps, gen_len)
    V = min(m.config.vocab_size for m in models)
    ids = torch.randint(3, V, (batch, prefill), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(models[0].parameters()).device)
    times = [[] for _ in models]
    for r in range(repeats + 1):  # the first round warms up
        order = list(range(len(models)))
        for i in (order if r % 2 else order[::-1]):
            t = scenario_run(models[i], ids, gen_len, decode_steps)
            if r:
                times[i].append(t)
    return times if per_round else [statistics.median(t) for t in times]


def paired_speedup(parent, child, batch, prefill, gen_len, repeats, decode_steps=None) -> dict:
    """The child's throughput speedup: median over rounds of t_parent / t_child (the two timed back to back in each
    round), with the spread (min, max) of those per-round ratios."""
    tp, tc = scenario_seconds([parent, child], batch, prefill, gen_len, repeats, decode_steps, per_round=True)
    ratios = [p / c for p, c in zip(tp, tc)]
    return {"measured_speedup": statistics.median(ratios), "measured_speedup_min": min(ratios),
            "measured_speedup_max": max(ratios), "speed_rounds": len(ratios),
            "measured_runtime_s": statistics.median(tc), "parent_runtime_s": statistics.median(tp)}


def swap_variants(model, cfgs: dict):
    """Put each {(layer, subblock): variant config} into `model` in place, with untrained weights (only the time
    matters); returns a function that puts the original subblocks back."""
    undos = [set_subblock(model, l, s, cfg, None) for (l, s), cfg in cfgs.items()]
    return lambda: [undo() for undo in reversed(undos)]


# ----------------------------------------------------------------------------
# Block runtimes inside the full model


def measure_block_runtimes(parent, space, batch, prefill, gen_len, repeats, decode_steps=None, num_layers=-1) -> dict:
    """{block_runtime_s: {subblock:name: seconds}, parent, non-block and ceiling runtimes} for the scenario.
    `parent` is already in the speed dtype; each variant goes into num_layers layers (-1: all but the last),
    spread evenly. Many layers, because savings are not additive on a CPU: a smaller model streams less from memory
    and every remaining layer gets faster (with k = L/2, children up to 2.5x measured up to 17 % faster than
    predicted); not all, because a model with no attention left also drops the once-per-step mask and KV-cache
    work (with k = L, predictions ran up to 10 % fast)."""
    t0 = time.time()
    L = parent.config.num_hidden_layers
    k = max(1, L - 1) if num_layers <= 0 else num_layers
    layers = sorted({i * L // k for i in range(k)})
    work = copy.deepcopy(parent)
    no_op = {s: config_from_dict(s, {"no_op": True}) for s in SUBBLOCKS}
    parent_times = []

    def paired(cfgs):  # per-round (t_parent, t_model) with `cfgs` swapped into the working copy
        undo = swap_variants(work, cfgs)
        tp, tm = scenario_seconds([parent, work], batch, prefill, gen_len, repeats, decode_steps, per_round=True)
        undo()
        parent_times.extend(tp)
        return tp, tm

    jobs = {(s, None): {(l, s): no_op[s] for l in layers} for s in SUBBLOCKS}  # s removed: the parent's cost
    jobs |= {(s, v["name"]): {(l, s): config_from_dict(s, v["config"]) for l in layers}
             for s in SUBBLOCKS for v in space[s] if not v["parent"] and not v["config"].get("no_op")}
    jobs["ceiling"] = {(l, s): no_op[s] for l in range(L) for s in SUBBLOCKS}  # every block removed
    times = {}
    for job, cfgs in progress(jobs.items(), total=len(jobs), desc="block runtimes", unit="model"):
        times[job] = paired(cfgs)
    diff = {job: statistics.median(m - p for p, m in zip(tp, tm)) for job, (tp, tm) in times.items()}

    block = {}
    for s in SUBBLOCKS:
        parent_cost = -diff[(s, None)] / k
        for v in space[s]:
            key = f"{s}:{v['name']}"
            if v["config"].get("no_op"):
                block[key] = 0.0
            else:
                block[key] = parent_cost if v["parent"] else parent_cost + diff[(s, v["name"])] / k
            print0(f"  runtime {key:<18} {block[key] * 1e3:8.3f} ms")
            if block[key] < 0:
                print0(f"warning: runtime {key} is negative ({block[key] * 1e3:.3f} ms): the model ran faster with it "
                       f"than without the subblock; kept as measured (timing noise, or more --cost-repeats)")
    parent_s = statistics.median(parent_times)
    pa, pf = (next(v["name"] for v in space[s] if v["parent"]) for s in SUBBLOCKS)
    nonblock = parent_s - L * (block[f"attention:{pa}"] + block[f"ffn:{pf}"])
    if nonblock < 0:
        print0(f"warning: the non-block runtime is negative ({nonblock * 1e3:.3f} ms); kept as measured")
    tp, tc = times["ceiling"]
    return {"block_runtime_s": block, "parent_runtime_s": parent_s, "nonblock_runtime_s": nonblock,
            "ceiling_runtime_s": statistics.median(tc),
            "ceiling_speedup": statistics.median(p / c for p, c in zip(tp, tc)),
            "cost_layers": k, "repeats": repeats, "decode_steps": decode_steps, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------
# The cost cache: runs/<name>/costs/, one file per device, threads, scenario, dtype, parent architecture, method


def device_name(threads):
    if torch.cuda.is_available():
        return re.sub(r"[^A-Za-z0-9]+", "-", f"cuda-{torch.cuda.get_device_name()}").strip("-")
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        m = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read())
        name = m.group(1) if m else name
    return re.sub(r"[^A-Za-z0-9]+", "-", f"cpu-{name}-t{threads}").strip("-")


def architecture_fingerprint(config, space) -> str:
    """A short sha1 of the parent's architecture and the search space's variant configs."""
    arch = {k: v for k, v in config.to_dict().items() if k in ARCH_FIELDS}
    variants = {s: [[v["name"], v["config"]] for v in space[s]] for s in SUBBLOCKS}
    return hashlib.sha1(json.dumps([arch, variants], sort_keys=True).encode()).hexdigest()[:12]


def cost_key(threads, scenario: str, dtype, config, space) -> dict:
    """What a cached measurement must match to be reused."""
    return {"device": device_name(threads), "threads": threads, "scenario": scenario,
            "dtype": str(dtype).removeprefix("torch."), "fingerprint": architecture_fingerprint(config, space),
            "method": COST_METHOD}


def cost_cache_path(run_dir, key) -> str:
    return os.path.join(run_dir, "costs", f"{key['device']}__{key['scenario']}-{key['dtype']}__{key['fingerprint']}"
                                          f"-{key['method']}.json")


def read_cached_costs(path, key) -> dict | None:
    """The cached costs at `path` if they were measured under `key`, else None. Raises CheckpointError if damaged."""
    if not os.path.exists(path):
        return None
    costs = read_json(path)
    return costs if isinstance(costs, dict) and costs.get("key") == key else None
