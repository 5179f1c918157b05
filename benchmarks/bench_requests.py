"""Request-level efficiency (issue #26, after the gpt-oss-puzzle paper): what a user pays for is requests, not tokens.
A child that decodes faster per token but writes longer answers can serve fewer requests per second than its parent.

    python benchmarks/bench_requests.py --models parent=runs/smol/parent,child=runs/smol/distilled,nano=runs/smol/rpo \
        --out runs/smol/requests                                       # 100 problems, budgets 64,128,256, 5 rounds
    python benchmarks/bench_requests.py --models parent=runs/smol/parent --problems 1 --rounds 1 --out /tmp/req  # smoke

Per model, held-out math (data_gen.math_problems.eval_problems(N, seed=0), greedy) at each reasoning effort:
  off            "detailed thinking off", up to --answer-tokens new tokens
  on             "detailed thinking on", up to --max-new-tokens-on (320: common.evaluate FULL's max_new_tokens_on)
  on, budget B   two-phase budget forcing: think for up to B tokens, cut at the model's own </think>; then append
                 "</think>\\n" (forced when the model had not closed the block) and generate the answer, up to
                 --answer-tokens, from prompt + thinking + "</think>\\n"
Accuracy (common.rewards.answer_correct) and tokens per request (thinking + tag + answer, counted with the model's
tokenizer), each with its SE over the problems (common.stats.mean_se).
Speed: decode tok/s at --batch (prompt --prompt-len random tokens, --gen-len new tokens), common.evaluate.speed_eval of
each model against the first one (the parent), one repeat per call, --rounds calls per model, the model order reversed
every other round: tok/s is the median over rounds, the ratio to the parent the median of the per-round ratios
(each round's pair measured back to back) with their min-max.
requests/s = tok/s / mean tokens per request, per (model, effort). Writes <out>/requests.json, requests.md (the
table) and requests.png (accuracy against requests/s and against tokens/s), and prints the table and, per pair of
models, the efforts where the faster model per token is the slower one per request.
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.checkpoint import CheckpointError, check_checkpoint, load_checkpoint  # noqa: E402
from common.cli import add_dtype_arg, die, int_list, off_or, positive_int  # noqa: E402
from common.data import build_messages, render_prompt  # noqa: E402
from common.dist import resolve_dtype  # noqa: E402
from common.evaluate import problem_text, speed_eval  # noqa: E402
from common.generate import generate  # noqa: E402
from common.rewards import THINK_CLOSE, THINK_OPEN, answer_correct  # noqa: E402
from common.stats import mean_se  # noqa: E402

FORCED_CLOSE = THINK_CLOSE + "\n"


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------
# Reasoning efforts: plain generation ("off", "on") and two-phase budget forcing ("on, budget B")


def plain(model, tokenizer, problems, reasoning: bool, max_new_tokens: int, batch_size: int, desc: str) -> list[dict]:
    prompts = [render_prompt(tokenizer, build_messages(problem_text(p), reasoning)) for p in problems]
    texts = [o[0] for o in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    desc=desc)]
    return [{"response": t, "tokens": n_tokens(tokenizer, t)} for t in texts]


def budget_forced(model, tokenizer, problems, budget: int, answer_tokens: int, batch_size: int,
                  desc: str = "") -> list[dict]:
    """Think for at most `budget` tokens (cut at the model's first </think>), close the block with "</think>\\n",
    then answer from prompt + thinking + "</think>\\n". `forced`: the model had not closed the block by itself.
    thinking_tokens is the thinking re-tokenized; if a decoded prefix re-tokenizes longer than `budget` (a byte
    split at the cut), it is cut to `budget` tokens, so no request thinks past its budget.
    A completion with no think tag at all (a model without the toggle, e.g. the embedded parent) did not think:
    it is the response as it stands (`no_think`, thinking_tokens 0); forcing a close would make it answer twice."""
    prompts = [render_prompt(tokenizer, build_messages(problem_text(p), True)) for p in problems]
    # no `stop`: the cut is made here, so we know whether the model closed the block itself (the HF path decodes to
    # the budget or EOS either way; generate's `stop` only cuts the text afterwards)
    first = [o[0] for o in generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size,
                                    desc=f"{desc}, thinking" if desc else None)]
    thoughts = []
    for text in first:
        if THINK_OPEN not in text and THINK_CLOSE not in text:
            thoughts.append((text, 0, None))
            continue
        closed = THINK_CLOSE in text
        thinking = text[:text.find(THINK_CLOSE)] if closed else text
        ids = tokenizer(thinking, add_special_tokens=False)["input_ids"]
        if len(ids) > budget:
            ids = ids[:budget]
            thinking = tokenizer.decode(ids)
        thoughts.append((thinking, len(ids), not closed))
    todo = [i for i, (_, _, forced) in enumerate(thoughts) if forced is not None]
    second = [prompts[i] + thoughts[i][0] + FORCED_CLOSE for i in todo]
    answers = generate(model, tokenizer, second, max_new_tokens=answer_tokens, batch_size=batch_size,
                       desc=f"{desc}, answer" if desc else None) if second else []
    answers = {i: o[0] for i, o in zip(todo, answers)}
    tag = n_tokens(tokenizer, FORCED_CLOSE)
    outs = []
    for i, (t, k, forced) in enumerate(thoughts):
        if forced is None:
            outs.append({"response": t, "thinking_tokens": 0, "forced": False, "no_think": True,
                         "tokens": n_tokens(tokenizer, t)})
        else:
            outs.append({"response": t + FORCED_CLOSE + answers[i], "thinking_tokens": k, "forced": forced,
                         "no_think": False, "tokens": k + tag + n_tokens(tokenizer, answers[i])})
    return outs


def effort_row(problems, outs: list[dict]) -> dict:
    correct = [float(answer_correct(o["response"], p.get("answer"))) for p, o in zip(problems, outs)]
    tokens = [float(o["tokens"]) for o in outs]
    (acc, acc_se), (tok, tok_se) = mean_se(correct), mean_se(tokens)
    row = {"accuracy": acc, "accuracy_se": acc_se, "tokens": tok, "tokens_se": tok_se,
           "correct": [bool(c) for c in correct], "tokens_per_problem": [int(t) for t in tokens],
           "samples": [{"prompt": problem_text(p), "response": o["response"], "correct": bool(c)}
                       for p, o, c in list(zip(problems, outs, correct))[:2]]}
    if "forced" in outs[0]:
        row["thinking_tokens"] = mean_se([float(o["thinking_tokens"]) for o in outs])[0]
        row["thinking_tokens_max"] = max(o["thinking_tokens"] for o in outs)
        row["forced"] = sum(o["forced"] for o in outs) / len(outs)
        row["no_think"] = sum(o["no_think"] for o in outs) / len(outs)
    return row


# ----------------------------------------------------------------------------
# Speed: decode tok/s at --batch, each model against the parent, per round


def speed_rounds(models: dict, batch: int, prompt_len: int, gen_len: int, rounds: int) -> dict:
    """{name: {tok_s, tok_s_rounds, ratio, ratio_min, ratio_max, ratio_rounds}}; the first model is the parent.
    speed_eval reports medians only, so each round is one speed_eval call (repeats=1) per model against the parent;
    the parent's tok/s in a round is the median of its measurements in that round's calls."""
    names = list(models)
    parent, key = models[names[0]], f"decode_tok_s_b{batch}"
    tok = {n: [] for n in names}
    ratio = {n: [] for n in names}
    for r in range(rounds):
        children = names[1:] if r % 2 == 0 else names[1:][::-1]  # machine drift hits every model alike
        if not children:
            tok[names[0]].append(speed_eval(parent, None, (batch,), prompt_len, gen_len, 1)["model"][key])
            ratio[names[0]].append(1.0)
            continue
        mine = []
        for n in children:
            res = speed_eval(models[n], parent, (batch,), prompt_len, gen_len, 1)
            tok[n].append(res["model"][key])
            ratio[n].append(res["ratio"][key])
            mine.append(res["parent"][key])
        tok[names[0]].append(statistics.median(mine))
        ratio[names[0]].append(1.0)
        print(f"speed round {r + 1}/{rounds}: " + ", ".join(f"{n} {tok[n][-1]:.1f} tok/s" for n in names), flush=True)
    return {n: {"tok_s": statistics.median(tok[n]), "tok_s_rounds": tok[n], "ratio": statistics.median(ratio[n]),
                "ratio_min": min(ratio[n]), "ratio_max": max(ratio[n]), "ratio_rounds": ratio[n]} for n in names}


# ----------------------------------------------------------------------------
# Per token against per request: the table, the pairwise statement, the figure


def request_rows(results: dict, speed: dict, efforts: list[str]) -> list[dict]:
    """One row per (model, effort): req/s = tok/s / tokens per request; its ratio to the parent at the same effort
    (median tok/s ratio x the parent's tokens per request / the model's, min-max from the per-round tok/s ratios)."""
    names = list(results)
    rows = []
    for n in names:
        for e in efforts:
            g, s, par = results[n][e], speed[n], results[names[0]][e]
            scale = par["tokens"] / g["tokens"] if g["tokens"] else float("nan")
            req = s["tok_s"] / g["tokens"] if g["tokens"] else float("nan")
            rows.append({"model": n, "effort": e, **{k: v for k, v in g.items() if k != "samples"},
                         "tok_s": s["tok_s"], "tok_s_ratio": s["ratio"], "req_s": req,
                         "req_s_se": req * g["tokens_se"] / g["tokens"] if g["tokens"] else None,  # tok/s held fixed
                         "req_s_ratio": s["ratio"] * scale, "req_s_ratio_min": s["ratio_min"] * scale,
                         "req_s_ratio_max": s["ratio_max"] * scale})
    return rows


def table_md(rows: list[dict]) -> str:
    lines = ["| model | effort | accuracy ± SE | tokens/request ± SE | tok/s (÷ parent) | req/s | "
             "req/s ÷ parent (min-max) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['effort']} | {r['accuracy']:.3f} ± {r['accuracy_se']:.3f} | "
                     f"{r['tokens']:.1f} ± {r['tokens_se']:.1f} | {r['tok_s']:.1f} ({r['tok_s_ratio']:.2f}x) | "
                     f"{r['req_s']:.3f} | {r['req_s_ratio']:.2f}x ({r['req_s_ratio_min']:.2f}-"
                     f"{r['req_s_ratio_max']:.2f}) |")
    return "\n".join(lines)


def per_token_vs_per_request(rows: list[dict], speed: dict) -> list[str]:
    """For each pair of models: the efforts at which the one with more tok/s serves fewer requests/s (or the one
    with fewer tok/s serves more), with the paired difference in tokens per request (same problems) and its SE.
    Speed is the paired one: each model's median per-round ratio to the parent (`speed[n]["ratio"]`), not the
    ratio of median tok/s, which carries the machine's drift between rounds."""
    by = {(r["model"], r["effort"]): r for r in rows}
    names = list(dict.fromkeys(r["model"] for r in rows))
    efforts = list(dict.fromkeys(r["effort"] for r in rows))
    out = []
    for a, b in itertools.combinations(names, 2):
        fast, slow = (a, b) if speed[a]["ratio"] >= speed[b]["ratio"] else (b, a)
        tok_ratio = speed[fast]["ratio"] / speed[slow]["ratio"]
        flips, wins = [], []
        for e in efforts:
            rf, rs = by[fast, e], by[slow, e]
            rr = tok_ratio * rs["tokens"] / rf["tokens"]  # requests/s = tok/s / tokens per request
            d, se = mean_se([x - y for x, y in zip(rf["tokens_per_problem"], rs["tokens_per_problem"])])
            (flips if rr < 1 else wins).append(f"{e} ({rr:.2f}x req/s: {rf['tokens']:.0f} vs {rs['tokens']:.0f} "
                                               f"tokens/request, {d:+.0f} ± {se:.0f} paired)")
        head = (f"{fast} vs {slow}: {fast} wins per token ({tok_ratio:.2f}x tok/s)" if tok_ratio > 1 else
                f"{fast} vs {slow}: equal per token (1.00x tok/s), {fast}")
        if flips:
            out.append(f"{head} but loses per request at " + "; ".join(flips) +
                       (f"; wins per request at {len(wins)} other effort(s)" if wins else ""))
        else:
            out.append(f"{head} and per request at every effort")
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for n in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == n]
        for ax, x in ((left, "req_s"), (right, "tok_s")):
            line = ax.errorbar([r[x] for r in mine], [r["accuracy"] for r in mine],
                               yerr=[r["accuracy_se"] for r in mine], marker="o", capsize=3, label=n,
                               linestyle="-" if x == "req_s" else "none")
            for r in mine:
                ax.annotate(r["effort"].replace("on, budget ", "B"), (r[x], r["accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3), color=line[0].get_color())
    left.set(xscale="log", xlabel="requests/s (tok/s ÷ tokens per request)", ylabel="accuracy (± SE)",
             title="per request: one curve per model across efforts")
    right.set(xlabel="decode tokens/s", ylabel="accuracy (± SE)", title="per token")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------
# CLI


def parse_models(p, spec: str) -> dict:
    models = {}
    for part in spec.split(","):
        name, eq, path = part.partition("=")
        if not (eq and name.strip() and path.strip()):
            p.error(f"argument --models: expected name=CKPT,name=CKPT,... got {part!r}")
        if name.strip() in models:
            p.error(f"argument --models: the name {name.strip()!r} appears twice")
        models[name.strip()] = path.strip()
    return models


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="name=CKPT,name=CKPT,...; the first is the parent")
    p.add_argument("--out", required=True, help="directory for requests.json, requests.md, requests.png")
    # efforts
    p.add_argument("--problems", type=positive_int, default=100, help="held-out math problems (eval_problems, seed 0)")
    p.add_argument("--budgets", type=int_list(1), default="64,128,256", help="thinking budgets of 'on, budget B'")
    p.add_argument("--answer-tokens", type=positive_int, default=80, help="'off' and the budgeted answers")
    p.add_argument("--max-new-tokens-on", type=positive_int, default=320, help="'on' without a budget")
    p.add_argument("--gen-batch", type=positive_int, default=32, help="generation batch (rows)")
    # speed
    p.add_argument("--batch", type=positive_int, default=16, help="the batch at which tok/s is measured")
    p.add_argument("--prompt-len", type=positive_int, default=128)
    p.add_argument("--gen-len", type=positive_int, default=64)
    p.add_argument("--rounds", type=positive_int, default=5)
    add_dtype_arg(p)
    p.add_argument("--threads", type=off_or(positive_int), default=-1, help="torch CPU threads (-1: torch's default)")
    args = p.parse_args(argv)
    if not args.budgets:
        p.error("argument --budgets: give at least one budget, e.g. 64,128,256")
    if args.gen_len < 2:
        p.error(f"argument --gen-len: need >= 2 tokens to time decoding, got {args.gen_len}")
    budgets = sorted(set(args.budgets))
    paths = parse_models(p, args.models)
    for path in paths.values():  # every checkpoint checked before anything is loaded
        try:
            check_checkpoint(path)
        except CheckpointError as e:
            die(str(e))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, device)
    try:
        loaded = {n: load_checkpoint(path, dtype=dtype, device=device) for n, path in paths.items()}
    except CheckpointError as e:
        die(str(e))
    from data_gen.math_problems import eval_problems
    problems = eval_problems(args.problems, seed=0)
    efforts = ["off"] + [f"on, budget {b}" for b in budgets] + ["on"]

    results, gen_s = {}, {}
    for n, (model, tok) in loaded.items():
        t = time.perf_counter()
        outs = {"off": plain(model, tok, problems, False, args.answer_tokens, args.gen_batch, f"{n}: off"),
                "on": plain(model, tok, problems, True, args.max_new_tokens_on, args.gen_batch, f"{n}: on")}
        for b in budgets:
            outs[f"on, budget {b}"] = budget_forced(model, tok, problems, b, args.answer_tokens, args.gen_batch,
                                                    f"{n}: budget {b}")
        results[n] = {e: effort_row(problems, outs[e]) for e in efforts}
        gen_s[n] = time.perf_counter() - t
    speed = speed_rounds({n: m for n, (m, _) in loaded.items()}, args.batch, args.prompt_len, args.gen_len,
                         args.rounds)
    rows = request_rows(results, speed, efforts)
    table = table_md(rows)
    statements = per_token_vs_per_request(rows, speed)

    os.makedirs(args.out, exist_ok=True)
    out = {"models": paths, "dtype": str(dtype).removeprefix("torch."), "device": device,
           "threads": torch.get_num_threads(), "args": vars(args) | {"budgets": budgets}, "efforts": efforts,
           "problems": len(problems), "speed": {"batch": args.batch, "prompt_len": args.prompt_len,
                                                "gen_len": args.gen_len, "rounds": args.rounds, **speed},
           "rows": rows, "samples": {n: {e: results[n][e]["samples"] for e in efforts} for n in results},
           "statements": statements, "table": table, "generation_s": gen_s, "wall_s": time.perf_counter() - t0}
    with open(os.path.join(args.out, "requests.json"), "w") as f:
        json.dump(out, f, indent=1)
    header = (f"{len(problems)} held-out math problems, greedy, {out['dtype']} on {device}, {out['threads']} threads; "
              f"decode tok/s at batch {args.batch} (prompt {args.prompt_len}, {args.gen_len} new tokens), median of "
              f"{args.rounds} interleaved rounds")
    with open(os.path.join(args.out, "requests.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n\n" + "\n".join(f"- {s}" for s in statements) + "\n")
    plot(rows, os.path.join(args.out, "requests.png"))
    print(f"\n{header}\n{table}\n")
    for s in statements:
        print(f"- {s}")
    print(f"\nwrote {args.out}/requests.json, requests.md, requests.png ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
