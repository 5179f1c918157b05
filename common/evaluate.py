"""The embedded evaluation suite: every checkpoint measured the same way, against the parent.

  text    held-out real text (data_gen.text, disjoint from BLD/KD training text): LM loss, next-token
          accuracy, KL(parent || model), top-1 agreement with the parent
  gen     held-out math problems with "detailed thinking on" and "off": accuracy, format compliance
          (<think>...</think> present when on, absent when off), mean response length
  speed   prefill tok/s and decode tok/s at batch 1 and a full batch, memory; model and parent measured
          in the same run, interleaved, reported as ratios

    python -m common.evaluate --model runs/smol/child --parent runs/smol/parent --stage child --run-dir runs/smol
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from common.checkpoint import CheckpointError, load_checkpoint, read_json, write_metrics
from common.data import build_messages, render_prompt, text_chunks
from common.fp8 import kv_cache_bytes
from common.generate import generate
from common.rewards import answer_correct, format_correct

MULTI_STEP_LEVEL = 4  # data_gen.math_problems: levels 4-5 are multi-step word problems

# ----------------------------------------------------------------------------
# Held-out text


class TextEval:
    """Runs the parent once over fixed held-out chunks and caches its log-probs (bf16); then each call
    scores a model against them with no further parent forward (stage 01 scores hundreds of variants)."""

    def __init__(self, parent, tokenizer, seq_len: int = 256, num_seqs: int = 32, batch_size: int = 8,
                 max_tokens: int | None = None):
        from data_gen.text import distill_documents

        if max_tokens:
            num_seqs = max(1, max_tokens // seq_len)
        self.batch_size = batch_size
        self.chunks = text_chunks(tokenizer, distill_documents("heldout"), seq_len)[:num_seqs]
        self.parent_logp = [lp.to(torch.bfloat16) for lp in self._logprobs(parent)]
        self.parent = self(None)

    def _batches(self, device):
        for i in range(0, len(self.chunks), self.batch_size):
            yield self.chunks[i:i + self.batch_size].to(device)

    @torch.inference_mode()
    def _logprobs(self, model):
        device = next(model.parameters()).device
        for ids in self._batches(device):
            yield F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1).cpu()

    @torch.inference_mode()
    def __call__(self, model) -> dict:
        """dict(lm_loss, next_token_acc, kl_parent, top1_agreement); model=None scores the parent itself."""
        was_training = model.training if model is not None else False
        if model is not None:
            model.eval()
        logps = (lp.float() for lp in self.parent_logp) if model is None else self._logprobs(model)
        tot = dict(lm_loss=0.0, next_token_acc=0.0, kl_parent=0.0, top1_agreement=0.0)
        n_tok = n_next = 0
        for ids, logq, logp in zip(self._batches("cpu"), logps, self.parent_logp):
            logp = logp.float()
            nxt = ids[:, 1:]
            tot["lm_loss"] += F.nll_loss(logq[:, :-1].flatten(0, 1), nxt.flatten(), reduction="sum").item()
            tot["next_token_acc"] += (logq[:, :-1].argmax(-1) == nxt).sum().item()
            tot["kl_parent"] += (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).sum().item()
            tot["top1_agreement"] += (logq.argmax(-1) == logp.argmax(-1)).sum().item()
            n_tok += ids.numel()
            n_next += nxt.numel()
        if model is not None:
            model.train(was_training)
        return {"lm_loss": tot["lm_loss"] / n_next, "next_token_acc": tot["next_token_acc"] / n_next,
                "kl_parent": tot["kl_parent"] / n_tok, "top1_agreement": tot["top1_agreement"] / n_tok}


# ----------------------------------------------------------------------------
# Generation: reasoning on / off


def generation_eval(model, tokenizer, problems, reasoning: bool, max_new_tokens: int = 160, batch_size: int = 16,
                    num_samples: int = 4) -> dict:
    """Greedy answers to held-out problems under "detailed thinking on/off" (REFERENCE.md: off is greedy)."""
    prompts = [render_prompt(tokenizer, build_messages(p["question"], reasoning)) for p in problems]
    outs = [o[0] for o in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]
    correct = [answer_correct(o, p["answer"]) for o, p in zip(outs, problems)]
    fmt = [format_correct(o, reasoning) for o in outs]
    lengths = [len(tokenizer(o, add_special_tokens=False).input_ids) for o in outs]
    multi = [c for c, p in zip(correct, problems) if p.get("difficulty", 0) >= MULTI_STEP_LEVEL]
    return {"accuracy": sum(correct) / len(problems),
            "accuracy_multistep": sum(multi) / len(multi) if multi else None,
            "format_compliance": sum(fmt) / len(problems),
            "mean_response_tokens": sum(lengths) / len(problems),
            "samples": [(p["question"], o, c) for p, o, c in list(zip(problems, outs, correct))[:num_samples]]}


# ----------------------------------------------------------------------------
# Speed: model and parent in the same run


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _speed_once(model, batch: int, seq_len: int, decode_tokens: int) -> dict:
    device = next(model.parameters()).device
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, seq_len), device=device)
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        t_prefill = _timed(lambda: model(input_ids=ids, use_cache=True), device)
        t1 = _timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen), device)
        tn = _timed(lambda: model.generate(ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, **gen), device)
    return {"prefill": batch * seq_len / t_prefill, "decode": batch * (decode_tokens - 1) / max(tn - t1, 1e-9)}


def model_memory_bytes(model, batch: int, tokens: int) -> int:
    """Weights + KV cache (bf16) for `batch` sequences of `tokens` tokens: computed, not measured, on CPU."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + kv_cache_bytes(model.config, batch * tokens, "bf16")


def speed_eval(model, parent, batch_size: int = 16, seq_len: int = 128, decode_tokens: int = 32,
               repeats: int = 3) -> dict:
    """Prefill and decode tok/s at batch 1 and batch_size, model and parent interleaved, median of repeats."""
    out = {"batch_size": batch_size, "prompt_len": seq_len, "decode_tokens": decode_tokens,
           "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    for b in sorted({1, batch_size}):
        runs = {"model": [], "parent": []}
        for m in (model, parent):  # warm-up: allocator, kernels, first-call overheads
            _speed_once(m, b, min(seq_len, 16), 2)
        for _ in range(repeats):
            for name, m in (("model", model), ("parent", parent)):
                runs[name].append(_speed_once(m, b, seq_len, decode_tokens))
        for name in runs:
            for k in ("prefill", "decode"):
                out[f"{k}_tok_s_b{b}_{name}"] = statistics.median(r[k] for r in runs[name])
        for k in ("prefill", "decode"):
            out[f"{k}_speedup_b{b}"] = out[f"{k}_tok_s_b{b}_model"] / out[f"{k}_tok_s_b{b}_parent"]
    for name, m in (("model", model), ("parent", parent)):
        dev = next(m.parameters()).device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            _speed_once(m, batch_size, seq_len, decode_tokens)
            out[f"peak_memory_bytes_{name}"] = torch.cuda.max_memory_allocated(dev)
        else:
            out[f"memory_bytes_{name}"] = model_memory_bytes(m, batch_size, seq_len + decode_tokens)
    key = "peak_memory_bytes" if f"peak_memory_bytes_model" in out else "memory_bytes"
    out["memory_ratio"] = out[f"{key}_model"] / out[f"{key}_parent"]
    out["memory_kind"] = "measured (CUDA peak)" if key == "peak_memory_bytes" else "computed: weights + bf16 KV cache"
    return out


# ----------------------------------------------------------------------------
# Everything, with retention against the parent


def evaluate_checkpoint(model, parent, tokenizer, text_eval: TextEval | None = None, suites=("text", "gen", "speed"),
                        quick: bool = False, gen_problems: int = 64, parent_gen: dict | None = None) -> dict:
    """All suites for `model` (parent is model: evaluated once). parent_gen reuses the parent's earlier gen numbers."""
    from data_gen.math_problems import eval_problems

    same = model is parent
    out = {}
    if "text" in suites:
        text_eval = text_eval or TextEval(parent, tokenizer, num_seqs=4 if quick else 32, seq_len=128 if quick else 256)
        out["text"] = {"model": text_eval.parent if same else text_eval(model), "parent": text_eval.parent}
        out["next_token_acc_retention"] = out["text"]["model"]["next_token_acc"] / out["text"]["parent"]["next_token_acc"]
    if "gen" in suites:
        problems = eval_problems(8 if quick else gen_problems, seed=0)
        max_new = 48 if quick else 160
        out["gen"] = {}
        for mode in ("on", "off"):
            res = generation_eval(model, tokenizer, problems, reasoning=mode == "on", max_new_tokens=max_new)
            res.pop("samples") if quick else None
            out["gen"][mode] = res
        out["gen_parent"] = out["gen"] if same else (parent_gen or {
            mode: generation_eval(parent, tokenizer, problems, mode == "on", max_new) for mode in ("on", "off")})
    if "speed" in suites:
        out["speed"] = speed_eval(model, parent, batch_size=4 if quick else 16, seq_len=32 if quick else 128,
                                  decode_tokens=8 if quick else 32, repeats=1 if quick else 3)
    return out


def print_summary(stage: str, m: dict) -> None:
    print(f"\n{stage}: evaluation suite")
    if "text" in m:
        t, p = m["text"]["model"], m["text"]["parent"]
        print("| text | model | parent |\n|---|---|---|")
        for k in t:
            print(f"| {k} | {t[k]:.4f} | {p[k]:.4f} |")
    if "gen" in m:
        print("| mode | accuracy | multi-step acc | format | mean tokens | parent acc |\n|---|---|---|---|---|---|")
        for mode, g in m["gen"].items():
            ms = "-" if g["accuracy_multistep"] is None else f"{g['accuracy_multistep']:.3f}"
            print(f"| {mode} | {g['accuracy']:.3f} | {ms} | {g['format_compliance']:.3f} | "
                  f"{g['mean_response_tokens']:.1f} | {m['gen_parent'][mode]['accuracy']:.3f} |")
    if "speed" in m:
        s = m["speed"]
        print("| speed | model | parent | ratio |\n|---|---|---|---|")
        for b in sorted({1, s["batch_size"]}):
            for k in ("prefill", "decode"):
                print(f"| {k} tok/s b{b} | {s[f'{k}_tok_s_b{b}_model']:.1f} | {s[f'{k}_tok_s_b{b}_parent']:.1f} | "
                      f"{s[f'{k}_speedup_b{b}']:.2f}x |")


def main(argv=None):
    p = argparse.ArgumentParser(description="The embedded evaluation suite for one checkpoint against its parent")
    p.add_argument("--model", required=True)
    p.add_argument("--parent", required=True)
    p.add_argument("--stage", required=True, help="name of metrics/<stage>.json")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--suites", default="text,gen,speed")
    p.add_argument("--gen-problems", type=int, default=64, help="held-out problems per mode")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke tests)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parent, tokenizer = load_checkpoint(args.parent, dtype=dtype, device=device)
        same = os.path.abspath(args.model) == os.path.abspath(args.parent)
        model = parent if same else load_checkpoint(args.model, dtype=dtype, device=device, with_tokenizer=False)[0]
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    parent_metrics = os.path.join(args.run_dir, "metrics", "parent.json")
    parent_gen = read_json(parent_metrics).get("gen") if not same and os.path.exists(parent_metrics) else None
    t0 = time.time()
    m = evaluate_checkpoint(model, parent, tokenizer, suites=tuple(args.suites.split(",")), quick=args.quick,
                            gen_problems=args.gen_problems, parent_gen=parent_gen)
    m.update({"model": args.model, "parent": args.parent, "dtype": args.dtype, "eval_wall_s": round(time.time() - t0, 1)})
    write_metrics(args.run_dir, args.stage, m)
    print_summary(args.stage, m)


if __name__ == "__main__":
    main()
