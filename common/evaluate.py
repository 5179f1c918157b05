"""The embedded evaluation suite: every checkpoint measured the same way, with retention against the parent.

    python -m common.evaluate --model runs/smol/parent --parent runs/smol/parent --stage parent --run-dir runs/smol \
        --data data/smol
    python -m common.evaluate --model runs/smol/sft --parent runs/smol/parent --stage sft --run-dir runs/smol \
        --data data/smol
    python -m common.evaluate ... --quick                       # tiny sizes: smoke runs and tests

Three suites (DESIGN.md "Evaluation: the embedded suite"), each a public function stages call directly:
  text   TextEval: held-out stdlib prose (common.text_corpus, disjoint from the distillation mix); LM loss,
         next-token accuracy, KL(parent || model) per token, top-1 agreement with the parent. The parent's
         full-vocab log-probs are computed once and cached, so scoring a variant costs one forward of it.
  gen    generation_eval: held-out math with "detailed thinking on" and "off": accuracy, format compliance (think
         block when on, no think tags when off), response length; plus instruction following (verifiers in
         common.rewards), reasoning off. The sets are data: the first --gen-problems math and --if-problems
         instruction problems of DIR/eval.jsonl (--data DIR, written by python -m data_gen.build, math round robin
         by level), or evaluate_checkpoint(gen_sets={"math": [...], "chat": [...]}).
  speed  speed_eval: prefill and decode tok/s at batch 1 and a full batch, peak memory; model and parent in
         the same run, interleaved, medians, reported as ratios model / parent.
Writes runs/<name>/metrics/<stage>.json and prints a table.
"""

import argparse
import hashlib
import json
import os
import statistics
import sys
import time

import torch

from common.checkpoint import (CheckpointError, check_checkpoint, check_metrics_free, load_checkpoint, read_json,
                               write_metrics)
from common.cli import add_dtype_arg, die, off_or, positive_int
from common.data import eval_sets
from common.dist import autocast_ctx, progress, resolve_dtype, sync
from common.gen_cache import GenCache, add_gen_cache_args, greedy_generate, open_gen_cache
from common.stats import mean_se
from common.tables import evaluation_tables
from common.text_corpus import distill_documents

# ----------------------------------------------------------------------------
# Helpers


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------
# Held-out text: LM loss, next-token accuracy, KL(parent || model), top-1 agreement

TEXT_METRICS = ("lm_loss", "next_token_acc", "kl_parent", "top1_agreement")


class TextEval:
    """Fixed held-out token chunks and the parent's next-token distributions on them, computed once.

    The cache holds the parent's full-vocab log-probs in float16 (log-probs lie in [-~100, 0], where float16
    is 8x finer than bf16 at the same 2 bytes): num_seqs x seq_len x vocab x 2 bytes (32 x 256 x 49152: 0.8 GB),
    kept on the CPU and moved per batch. KL is computed between the two renormalized float16-rounded
    distributions, so it is >= 0 and exactly 0 for a model identical to the parent (same dtype).
    `max_tokens` (instead of num_seqs) is accepted: num_seqs = max_tokens // seq_len.
    """

    def __init__(self, parent, tokenizer, seq_len: int = 256, num_seqs: int = 32, batch_size: int = 8,
                 max_tokens: int | None = None, documents: list[str] | None = None):
        from common.data import text_chunks

        if max_tokens is not None:
            num_seqs = max(1, max_tokens // seq_len)
        chunks = text_chunks(tokenizer, distill_documents("heldout") if documents is None else documents, seq_len)
        if num_seqs > len(chunks):
            print(f"TextEval: only {len(chunks)} held-out chunks of {seq_len} tokens; using all of them")
            num_seqs = len(chunks)
        # evenly spaced over the held-out set, so both pydoc topics and module docstrings are in it
        idx = torch.linspace(0, len(chunks) - 1, num_seqs).round().long().unique()
        self.ids = chunks[idx]
        self.batch_size, self.seq_len = batch_size, seq_len
        self.dtype = next(parent.parameters()).dtype
        gib = self.ids.numel() * parent.config.vocab_size * 2 / 2**30
        if gib > 8:
            print(f"TextEval: the parent cache takes {gib:.1f} GiB of CPU memory; lower num_seqs / max_tokens")
        self.parent_logp = torch.empty(*self.ids.shape, parent.config.vocab_size, dtype=torch.float16)
        self.parent_top1 = torch.empty(self.ids.shape, dtype=torch.long)
        t = time.perf_counter()
        stats = self._run(parent, cache=True)
        n = len(self.ids)
        self.parent_metrics = {**stats, "kl_parent": 0.0, "top1_agreement": 1.0, "kl_parent_se": 0.0,
                               "top1_agreement_se": 0.0, "per_seq": {**stats["per_seq"], "kl_parent": [0.0] * n,
                                                                     "top1_agreement": [1.0] * n}}
        self.parent_seconds = time.perf_counter() - t

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    @torch.inference_mode()
    def _run(self, model, cache: bool) -> dict:
        device = _device(model)
        n_tgt = self.ids.shape[0] * (self.ids.shape[1] - 1)
        loss = correct = kl = agree = 0.0
        T = self.ids.shape[1]
        per_seq = {k: [] for k in TEXT_METRICS[:2 if cache else 4]}  # the chunks are the sampling units
        batches = range(0, len(self.ids), self.batch_size)
        for s in progress(batches, desc="text eval" + (" (parent cache)" if cache else ""), unit="batch", leave=False):
            ids = self.ids[s:s + self.batch_size]
            logits = model(ids.to(device), use_cache=False).logits
            for r in range(ids.shape[0]):  # one row at a time: (T, vocab) float32 temporaries stay small
                row = logits[r].float()
                logq = row.log_softmax(-1)
                tgt = ids[r, 1:].to(device)
                row_loss = -logq[:-1].gather(-1, tgt[:, None]).sum().item()
                row_correct = (row[:-1].argmax(-1) == tgt).sum().item()
                loss, correct = loss + row_loss, correct + row_correct
                per_seq["lm_loss"].append(row_loss / (T - 1))
                per_seq["next_token_acc"].append(row_correct / (T - 1))
                top1 = row.argmax(-1).cpu()
                lq16 = logq.clamp_min(-6e4).half()
                if cache:
                    self.parent_logp[s + r], self.parent_top1[s + r] = lq16.cpu(), top1
                    continue
                lp = self.parent_logp[s + r].to(device).float()
                lp = lp - lp.logsumexp(-1, keepdim=True)
                lq = lq16.float()
                lq = lq - lq.logsumexp(-1, keepdim=True)
                row_kl = (lp.exp() * (lp - lq)).sum().item()
                row_agree = (top1 == self.parent_top1[s + r]).sum().item()
                kl, agree = kl + row_kl, agree + row_agree
                per_seq["kl_parent"].append(row_kl / T)
                per_seq["top1_agreement"].append(row_agree / T)
        out = {"lm_loss": loss / n_tgt, "next_token_acc": correct / n_tgt}
        if not cache:
            out |= {"kl_parent": kl / self.ids.numel(), "top1_agreement": agree / self.ids.numel()}
        return out | {f"{k}_se": mean_se(v)[1] for k, v in per_seq.items()} | {"per_seq": per_seq}

    def __call__(self, model) -> dict:
        """lm_loss, next_token_acc (over seq_len-1 targets per chunk), kl_parent (mean per token), top1_agreement;
        beside each, <metric>_se: its standard error over the chunks; per_seq: {metric: [one value per chunk]},
        for paired comparisons of two models on the same chunks (paired_diff)."""
        return self._run(model, cache=False)


# ----------------------------------------------------------------------------
# Generation: accuracy with the reasoning toggle, format compliance, instruction following


def problem_text(p: dict) -> str:
    for k in ("input", "prompt", "question"):
        if isinstance(p.get(k), str):
            return p[k]
    raise ValueError(f"problem {p.get('id', '?')} has none of input / prompt / question")


def toggle_eval(model, tokenizer, problems: list[dict], max_new_tokens: int = 16, batch_size: int = 32,
                cache: GenCache | None = None, desc: str = "toggle") -> dict:
    """The reasoning toggle where it decides, at the first tokens: the share of greedy answers that open with a
    think block under "detailed thinking on" and under "off", on the same problems, each with its standard error.
    Only `max_new_tokens` are generated, so 100+ problems cost about one long-answer batch."""
    from common.data import build_messages, render_prompt
    from common.rewards import THINK_OPEN

    out = {"n": len(problems), "max_new_tokens": max_new_tokens}
    for mode in ("on", "off"):
        prompts = [render_prompt(tokenizer, build_messages(problem_text(p), mode == "on")) for p in problems]
        texts = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, cache, f"{desc}, thinking {mode}")
        out[f"think_rate_{mode}"], out[f"think_rate_{mode}_se"] = mean_se(
            [float(t.lstrip().startswith(THINK_OPEN)) for t, _ in texts])
    return out


def generation_eval(model, tokenizer, problems: list[dict], reasoning: bool, max_new_tokens: int = 256,
                    batch_size: int = 16, num_samples: int = 3, desc: str | None = None,
                    cache: GenCache | None = None, engine=None) -> dict:
    """Greedy answers under "detailed thinking on"/"off". A problem with `constraints` is scored by the
    instruction-following verifiers (correct = all satisfied); otherwise `answer` is checked on the answer part
    (after </think>). format_compliance: think block first when on, no think tags when off.
    `desc` names the progress bar (default: "generation, thinking on/off").
    `cache` (common.gen_cache; default none): reuse the answers it holds for this model's weights, prompts, budget
    and compute setting and decode only the others; a cached answer is one valid greedy answer of those weights.
    `engine` (a VLLMGenerator synced with `model`): vLLM decodes the answers instead of our decoder."""
    from common.data import build_messages, render_prompt
    from common.rewards import answer_correct, format_correct, instruction_following_score

    if not problems:
        return {"n": 0}
    prompts = [render_prompt(tokenizer, build_messages(problem_text(p), reasoning)) for p in problems]
    desc = desc or f"generation, thinking {'on' if reasoning else 'off'}"
    outs = [text for text, _ in greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, cache, desc,
                                                engine=engine)]
    correct, fmt, lengths, if_scores, samples = [], [], [], [], []
    for p, text in zip(problems, outs):
        if p.get("constraints"):
            score = instruction_following_score(text, p["constraints"])
            if_scores.append(score)
            ok = score == 1.0
        else:
            ok = answer_correct(text, p.get("answer"))  # the answer part only, boxed or stated
        correct.append(ok)
        fmt.append(format_correct(text, reasoning))
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        if len(samples) < num_samples:
            samples.append({"prompt": problem_text(p), "response": text, "correct": bool(ok)})
    n = len(problems)
    out = {"n": n, "accuracy": sum(correct) / n, "format_compliance": sum(fmt) / n,
           "mean_response_tokens": sum(lengths) / n,
           "truncated": sum(x >= max_new_tokens for x in lengths) / n,  # re-tokenized: approximate at the limit
           "correct": [bool(c) for c in correct],  # per problem, in order: paired before/after comparisons
           "format_ok": [bool(f) for f in fmt]}
    math = [(p["difficulty"], ok) for p, ok in zip(problems, correct) if "difficulty" in p and not p.get("constraints")]
    if math:  # math: accuracy per difficulty level; "multistep" = levels >= 3 (two or more steps)
        levels = sorted({lv for lv, _ in math})
        out["accuracy_by_level"] = {str(lv): sum(ok for l_, ok in math if l_ == lv) / sum(l_ == lv for l_, _ in math)
                                    for lv in levels}
        multi = [ok for lv, ok in math if lv >= 3]
        out["accuracy_multistep"] = sum(multi) / len(multi) if multi else None
    if if_scores:
        out["instruction_score"] = sum(if_scores) / len(if_scores)  # loose: fraction of constraints met
    out["samples"] = samples
    return out


# ----------------------------------------------------------------------------
# Speed: prefill / decode tok/s and memory, model and parent interleaved


def math_both_modes(model, tokenizer, problems: list[dict], max_new_tokens_on: int, max_new_tokens_off: int,
                    batch_size: int = 32, dtype=None, cache: GenCache | None = None, who: str | None = None,
                    engine=None) -> dict:
    """generation_eval with "detailed thinking on" and "off" ({"on": ..., "off": ...}; {} without problems): a
    training stage's before/after evaluation, the model in eval mode under the stage's autocast, in train mode after.
    `engine` (an RL stage's colocated VLLMGenerator): synced with the model's weights, then it decodes."""
    if not problems:
        return {}
    if engine is not None:
        engine.update_weights(model)
    model.eval()
    with autocast_ctx(_device(model), dtype):
        out = {mode: generation_eval(model, tokenizer, problems, reasoning=mode == "on", batch_size=batch_size,
                                     max_new_tokens=max_new_tokens_on if mode == "on" else max_new_tokens_off,
                                     desc=f"{who}: math, thinking {mode}" if who else None, cache=cache,
                                     engine=engine)
               for mode in ("on", "off")}
    model.train()
    return out


def kv_cache_bytes_per_token(model, seq_len: int | None = None) -> float:
    """K and V bytes one token costs across all layers that keep a cache (ours or any HF Llama). With seq_len, the
    mean over a sequence of that many tokens: a window layer caches only min(seq_len, W + S) of them
    (common/variants.window_positions)."""
    from common.variants import window_positions

    elem = next(model.parameters()).element_size()
    total = 0.0
    for m in model.modules():
        if hasattr(m, "k_proj") and hasattr(m, "v_proj"):
            share = 1.0 if seq_len is None or getattr(m, "window", None) is None else \
                window_positions(seq_len, m.window, m.sinks) / seq_len
            total += (m.k_proj.out_features + m.v_proj.out_features) * elem * share
    return total


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():  # tied embeddings counted once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


@torch.inference_mode()
def speed_eval(model, parent=None, batch_sizes=(1, 16), prompt_len: int = 128, gen_len: int = 32, repeats: int = 3,
               seed: int = 0, batch_size: int | None = None, seq_len: int | None = None,
               decode_tokens: int | None = None) -> dict:
    """Prefill tok/s (time to first token), decode tok/s, peak memory; medians over `repeats`, interleaved
    model, parent, model, ... With `parent`, ratios model/parent (> 1: the model is faster / bigger).

    Prompts are random token ids; every row decodes exactly gen_len tokens greedily (min_new_tokens ==
    max_new_tokens, so EOS cannot end it early). prefill = generate(1 token); decode tok/s =
    batch*(gen_len-1) / (t(gen_len tokens) - t(1 token)), per repeat.
    Memory: CUDA: max_memory_allocated above what was allocated before the run, plus the model's weights;
    CPU: weights + KV cache at prompt_len+gen_len tokens, computed (activations not counted).
    `batch_size`, `seq_len`, `decode_tokens` are older names for (batch_sizes,), prompt_len, gen_len.
    """
    if batch_size is not None:
        batch_sizes = (batch_size,)
    prompt_len = seq_len or prompt_len
    gen_len = decode_tokens or gen_len
    if gen_len < 2:
        raise ValueError(f"speed_eval: gen_len={gen_len}; need >= 2 tokens to time decoding")
    models = {"model": model} if parent is None else {"model": model, "parent": parent}
    device = _device(model)
    g = torch.Generator().manual_seed(seed)
    vocab = min(m.config.vocab_size for m in models.values())
    prompts = {b: torch.randint(3, vocab, (b, prompt_len), generator=g).to(device) for b in batch_sizes}
    cuda = device.type == "cuda"

    def gen(m, ids, n):
        return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)

    for m in models.values():  # warm-up (allocator, kernels, generate's first-call setup)
        gen(m, prompts[batch_sizes[0]][:, :8], 2)
    t1 = {(k, b): [] for k in models for b in batch_sizes}
    tdec = {(k, b): [] for k in models for b in batch_sizes}
    peak = {}
    runs = [(b, name, m) for _ in range(repeats) for b in batch_sizes for name, m in models.items()]
    for b, name, m in progress(runs, desc=f"speed ({', '.join(models)})", unit="run"):
        t_first = _timed(lambda: gen(m, prompts[b], 1))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t_all = _timed(lambda: gen(m, prompts[b], gen_len))
        if cuda:
            peak[(name, b)] = torch.cuda.max_memory_allocated() - base + weight_bytes(m)
        t1[(name, b)].append(t_first)
        tdec[(name, b)].append(max(t_all - t_first, 1e-9))
    out = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": device.type,
           "batch_sizes": list(batch_sizes), "prompt_len": prompt_len, "gen_len": gen_len, "repeats": repeats,
           "memory": "cuda max_memory_allocated (delta) + weights" if cuda
           else "computed: weights + KV cache at prompt_len+gen_len (no activations)"}
    for name, m in models.items():
        r = {}
        for b in batch_sizes:
            r[f"prefill_tok_s_b{b}"] = b * prompt_len / statistics.median(t1[(name, b)])
            r[f"decode_tok_s_b{b}"] = b * (gen_len - 1) / statistics.median(tdec[(name, b)])
            mem = peak.get((name, b), weight_bytes(m) + b * (prompt_len + gen_len) * kv_cache_bytes_per_token(
                m, prompt_len + gen_len))
            r[f"peak_mem_mb_b{b}"] = mem / 2**20
        out[name] = r
    if parent is not None:
        out["ratio"] = {k: out["model"][k] / out["parent"][k] for k in out["model"]}
        top = max(batch_sizes)  # the names 03/04 read: throughput ratios at the largest batch
        out["prefill_speedup"] = out["ratio"][f"prefill_tok_s_b{top}"]
        out["decode_speedup"] = out["ratio"][f"decode_tok_s_b{top}"]
    return out


# ----------------------------------------------------------------------------
# One checkpoint, every suite


# Sized for a 2-core CPU (~3 min on the 135M parent in float32): one generation batch per suite (a rambling
# model runs every row to the limit, so one batch of 32 beats two of 16), limits above the data_gen targets
# (worked math solutions ~120 tokens, the longest ~320; instruction answers ~50).
FULL = dict(text_seqs=32, seq_len=256, gen_problems=30, if_problems=12, max_new_tokens_on=320,
            max_new_tokens_off=80, gen_batch_size=32, speed_batch_sizes=(1, 16), speed_prompt_len=128,
            speed_gen_len=32, speed_repeats=3)
QUICK = dict(text_seqs=2, seq_len=64, gen_problems=4, if_problems=2, max_new_tokens_on=16, max_new_tokens_off=16,
             gen_batch_size=4, speed_batch_sizes=(1, 2), speed_prompt_len=16, speed_gen_len=4, speed_repeats=1)


def _ratio(a, b):
    return a / b if a is not None and b else None


def first_problems(gen_sets: dict | None, s: dict) -> tuple[list[dict], list[dict]]:
    """The gen suite's math and instruction problems: the first s["gen_problems"] of gen_sets["math"] and the first
    s["if_problems"] of gen_sets["chat"]; ValueError naming the fix when the sets are missing or too small."""
    if gen_sets is None:
        raise ValueError("the gen suite needs the evaluation sets: pass gen_sets=common.data.eval_sets(DIR) (DIR "
                         "written by python -m data_gen.build) or drop 'gen' from suites")
    out = []
    for kind, size, flag, build_flag in (("math", "gen_problems", "--gen-problems", "--eval-math"),
                                         ("chat", "if_problems", "--if-problems", "--eval-instructions")):
        have = gen_sets.get(kind) or []
        if len(have) < s[size]:
            raise ValueError(f"the gen suite asks for {s[size]} {kind} problems ({flag}) and the evaluation sets have "
                             f"{len(have)}; ask for fewer or build more (python -m data_gen.build {build_flag} N)")
        out.append(list(have[:s[size]]))
    return out[0], out[1]


def problems_sha1(problems: list[dict]) -> str:
    """The identity of an evaluation set: a hash of what each problem asks and expects, in order. Stored in the
    settings, so a cached parent result (parent_gen) is reused only on the very same problems."""
    rows = [[problem_text(p), p.get("answer"), p.get("constraints"), p.get("difficulty")] for p in problems]
    return hashlib.sha1(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _gen_suite(model, tokenizer, s: dict, math: list[dict], chat: list[dict], who: str = "model",
               cache: GenCache | None = None) -> dict:
    bs = s["gen_batch_size"]
    return {"gen_on": generation_eval(model, tokenizer, math, True, s["max_new_tokens_on"], bs,
                                      desc=f"{who}: math, thinking on", cache=cache),
            "gen_off": generation_eval(model, tokenizer, math, False, s["max_new_tokens_off"], bs,
                                       desc=f"{who}: math, thinking off", cache=cache),
            "gen_if": generation_eval(model, tokenizer, chat, False, s["max_new_tokens_off"], bs,
                                      desc=f"{who}: instruction following", cache=cache)}


def _strip_samples(gen: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk not in ("samples", "correct", "format_ok")} for k, v in gen.items()}


def evaluate_checkpoint(model, parent, tokenizer, text_eval: TextEval | None = None,
                        suites=("text", "gen", "speed"), quick: bool = False, parent_gen: dict | None = None,
                        gen_cache: GenCache | None = None, gen_sets: dict | None = None, **overrides) -> dict:
    """All suites on `model`, with the parent's numbers and retention = model / parent.

    `gen_sets` ({"math": [problems], "chat": [problems]}, e.g. common.data.eval_sets of a data_gen.build directory;
    required by the gen suite): it evaluates the first gen_problems / if_problems of each.
    `model is parent` evaluates once (KL 0, agreement 1, retention 1; speed measured once). `parent_gen` (the
    "parent_gen" entry of an earlier metrics JSON with the same settings, the sets' identity gen_sets_sha1 included)
    spares re-running the parent's generation. `gen_cache` (common.gen_cache) reuses greedy answers any stage
    already decoded for the same weights, prompts and budgets, for the model and the parent. `overrides` change
    any size in FULL / QUICK (e.g. gen_problems=50).
    """
    unknown = set(suites) - {"text", "gen", "speed"}
    if unknown:
        raise ValueError(f"unknown suites {sorted(unknown)}; choose from text, gen, speed")
    s = {**(QUICK if quick else FULL), **overrides}
    same = model is parent
    out = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": _device(model).type,
           "quick": quick, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}}
    if "gen" in suites:  # checked before the first suite runs
        math, chat = first_problems(gen_sets, s)
        out["settings"]["gen_sets_sha1"] = problems_sha1(math + chat)
    timing, retention = {}, {}
    if "text" in suites:
        t = time.perf_counter()
        if text_eval is None:
            text_eval = TextEval(parent, tokenizer, seq_len=s["seq_len"], num_seqs=s["text_seqs"])
        pm = text_eval.parent_metrics
        m = dict(pm) if same else text_eval(model)
        out["text"] = {**m, "tokens": text_eval.num_tokens, "parent_lm_loss": pm["lm_loss"],
                       "parent_next_token_acc": pm["next_token_acc"]}
        retention["next_token_acc"] = _ratio(m["next_token_acc"], pm["next_token_acc"])
        retention["lm_loss"] = _ratio(pm["lm_loss"], m["lm_loss"])  # > 1 would be a lower loss than the parent's
        timing["text_s"] = time.perf_counter() - t
    if "gen" in suites:
        t = time.perf_counter()
        gen = _gen_suite(model, tokenizer, s, math, chat, cache=gen_cache)
        out |= _strip_samples(gen)
        out["samples"] = {k: v["samples"] for k, v in gen.items()}
        if same:
            parent_gen = _strip_samples(gen)
        elif parent_gen is None or (parent_gen.get("settings"), parent_gen.get("dtype")) != (out["settings"], out["dtype"]):
            parent_gen = _strip_samples(_gen_suite(parent, tokenizer, s, math, chat, who="parent", cache=gen_cache))
        parent_gen = {**{k: v for k, v in parent_gen.items() if k not in ("settings", "dtype")},
                      "settings": out["settings"], "dtype": out["dtype"]}
        out["parent_gen"] = parent_gen
        for k in ("gen_on", "gen_off", "gen_if"):
            retention[f"{k}_accuracy"] = _ratio(out[k]["accuracy"], parent_gen[k]["accuracy"])
        timing["gen_s"] = time.perf_counter() - t
    if "speed" in suites:
        t = time.perf_counter()
        out["speed"] = speed_eval(model, None if same else parent, s["speed_batch_sizes"], s["speed_prompt_len"],
                                  s["speed_gen_len"], s["speed_repeats"])
        if same:  # the parent against itself: ratios are 1 by definition, not measured twice
            out["speed"]["parent"] = dict(out["speed"]["model"])
            out["speed"]["ratio"] = {k: 1.0 for k in out["speed"]["model"]}
        timing["speed_s"] = time.perf_counter() - t
    out["retention"] = retention
    out["timing"] = timing
    return out


# ----------------------------------------------------------------------------
# CLI


def main(argv=None):
    p = argparse.ArgumentParser(description="The embedded evaluation suite on one checkpoint, against the parent")
    p.add_argument("--model", required=True, help="checkpoint directory to evaluate")
    p.add_argument("--parent", required=True, help="the parent checkpoint (ratios and KL are against it)")
    p.add_argument("--stage", required=True, help="name of metrics/<stage>.json")
    p.add_argument("--run-dir", required=True, help="runs/<name>: the metrics go to <run-dir>/metrics/")
    p.add_argument("--suites", default="text,gen,speed")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="a directory written by python -m data_gen.build: the gen suite evaluates the first "
                   "--gen-problems math and --if-problems instruction problems of DIR/eval.jsonl (math round robin by "
                   "level, so balanced); required by the gen suite")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke runs, tests)")
    add_dtype_arg(p, "evaluation dtype")
    p.add_argument("--threads", type=off_or(positive_int), default=-1, help="torch CPU threads (-1: torch's default)")
    add_gen_cache_args(p)
    # sizes (default: FULL, or QUICK with --quick); -1 keeps the default
    for k, v in FULL.items():
        if not isinstance(v, tuple):
            p.add_argument("--" + k.replace("_", "-"), type=off_or(positive_int), default=-1,
                           help=f"default {v} (quick {QUICK[k]})")
    args = p.parse_args(argv)
    suites = tuple(args.suites.split(","))
    unknown = set(suites) - {"text", "gen", "speed"}
    if unknown:
        p.error(f"argument --suites: unknown suite(s) {sorted(unknown)}; choose from text,gen,speed")
    if "gen" in suites and args.data is None:
        die("--data: the gen suite needs the evaluation sets; give a directory written by python -m data_gen.build")
    for path in (args.model, args.parent):  # everything is checked before the (long) evaluation starts
        check_checkpoint(path)
    check_metrics_free(args.run_dir, args.stage, args.model)
    overrides = {k: getattr(args, k) for k in FULL if not isinstance(FULL[k], tuple) and getattr(args, k) >= 0}
    gen_sets = None
    if "gen" in suites:
        gen_sets = eval_sets(args.data)
        first_problems(gen_sets, {**(QUICK if args.quick else FULL), **overrides})  # enough of each, or a ValueError
    gen_cache = open_gen_cache(args.run_dir, args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, device)
    same = os.path.realpath(args.model) == os.path.realpath(args.parent)
    parent, tokenizer = load_checkpoint(args.parent, dtype=dtype, device=device)
    model = parent if same else load_checkpoint(args.model, dtype=dtype, device=device, with_tokenizer=False)[0]
    parent_gen = None
    cached = os.path.join(args.run_dir, "metrics", "parent.json")
    if not same and os.path.exists(cached):  # the parent's generation numbers from its own evaluation
        parent_gen = read_json(cached).get("parent_gen")
    metrics = evaluate_checkpoint(model, parent, tokenizer, suites=suites, quick=args.quick, parent_gen=parent_gen,
                                  gen_cache=gen_cache, gen_sets=gen_sets, **overrides)
    metrics = {"stage": args.stage, "model": args.model, "parent": args.parent, **metrics,
               "wall_s": time.perf_counter() - t0}
    metrics["report"] = evaluation_tables(metrics, args.stage)
    path = write_metrics(args.run_dir, args.stage, metrics, out=args.model)
    print("\n".join(metrics["report"]))
    print(f"{args.stage}: {metrics['dtype']} on {metrics['device']}, {metrics['wall_s']:.0f}s; metrics: {path}")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
