"""Our DeciLMForCausalLM vs transformers' LlamaForCausalLM on the parent's architecture, same weights, one run.

    python benchmarks/bench_model.py                                  # runs/smol/parent, bf16 and float32
    python benchmarks/bench_model.py --parent runs/smol/parent --repeats 3 --dtypes bfloat16

Measurements alternate ours / transformers within every repeat (so drift in machine load hits both), and the
table reports medians and the ratio ours/transformers for: forward time (batch x seq, no cache, full logits),
greedy generation tok/s at batch 1 and 16 (random prompts, fixed length: min_new_tokens = max_new_tokens), and
model-only decode tok/s at batch 16 with 128 cached tokens (where attention's share of a step is largest).
Target: ours within 1.05x of transformers (time ratio <= 1.05, tok/s ratio >= 1/1.05).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from common.checkpoint import load_checkpoint  # noqa: E402


def llama_from_ours(model) -> LlamaForCausalLM:
    """The identical transformers Llama: a parent-shaped config of ours is a Llama config, names are the same."""
    c = model.config
    if len({(b.attention.n_heads_in_group, b.ffn.ffn_mult) for b in c.block_configs}) != 1:
        raise ValueError("bench_model compares a parent-shaped checkpoint (all blocks equal) with LlamaForCausalLM")
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size(0),
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_kv_heads(0), head_dim=c.head_dim, hidden_act=c.hidden_act,
                      max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                      rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                      bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                      attn_implementation="sdpa")
    llama = LlamaForCausalLM(cfg)
    inv_freq = llama.model.rotary_emb.inv_freq.clone()
    llama = llama.to(model.dtype)
    # .to() casts buffers too; from_pretrained(dtype=bf16) keeps RoPE's inv_freq in float32, as ours does
    llama.model.rotary_emb.inv_freq = inv_freq
    sd = model.state_dict()
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (c.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight names differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return llama.eval()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.inference_mode()
def bench(models: dict, batch: int, seq: int, gen_batches, prompt_len: int, gen_len: int, repeats: int,
          decode_ctx: int = 128) -> dict:
    """{(metric, name): median}; metric: forward_s, gen_tok_s@b, decode_tok_s (largest b)."""
    vocab = next(iter(models.values())).config.vocab_size
    g = torch.Generator().manual_seed(0)
    fwd_ids = torch.randint(3, vocab, (batch, seq), generator=g)
    gen_ids = {b: torch.randint(3, vocab, (b, prompt_len), generator=g) for b in gen_batches}
    kw = dict(max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False, pad_token_id=0)

    def run_fwd(m):
        return timed(lambda: m(fwd_ids, use_cache=False))

    def run_gen(m, b):
        ids = gen_ids[b]
        return b * gen_len / timed(lambda: m.generate(ids, attention_mask=torch.ones_like(ids), **kw))

    dec_ids = torch.randint(3, vocab, (max(gen_batches), decode_ctx), generator=g)

    def run_decode(m, steps=16):
        """Model-only decode (no generate() overhead): 16 cached steps after a decode_ctx-token prefill."""
        out = m(dec_ids, use_cache=True, logits_to_keep=1)
        cache, tok, b = out.past_key_values, out.logits[:, -1:].argmax(-1), dec_ids.shape[0]
        t = time.perf_counter()
        for i in range(steps):
            pos = torch.full((b, 1), decode_ctx + i)
            tok = m(tok, past_key_values=cache, use_cache=True, position_ids=pos).logits[:, -1:].argmax(-1)
        return b * steps / (time.perf_counter() - t)

    for m in models.values():  # warm-up: first-call allocations, kernels
        m(fwd_ids[:1, :16], use_cache=False)
        m.generate(gen_ids[gen_batches[0]][:, :8], attention_mask=torch.ones_like(gen_ids[gen_batches[0]][:, :8]),
                   **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    samples: dict = {}
    for _ in range(repeats):
        for name, m in models.items():  # interleaved: ours, transformers, ours, ...
            samples.setdefault(("forward_s", name), []).append(run_fwd(m))
        for b in gen_batches:
            for name, m in models.items():
                samples.setdefault((f"gen_tok_s@{b}", name), []).append(run_gen(m, b))
        if decode_ctx > 0:
            for name, m in models.items():
                samples.setdefault(("decode_tok_s", name), []).append(run_decode(m))
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parent", default="runs/smol/parent")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--gen-batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--decode-ctx", type=int, default=128, help="cached tokens for the model-only decode row (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen_batches = [int(b) for b in args.gen_batches.split(",")]

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours, _ = load_checkpoint(args.parent, dtype=dtype, with_tokenizer=False)
        llama = llama_from_ours(ours)
        with torch.inference_mode():  # same weights, same function
            ids = torch.randint(3, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
            diff = (ours(ids).logits.float() - llama(ids).logits.float()).abs().max().item()
        res = bench({"ours": ours, "transformers": llama}, args.batch, args.seq, gen_batches, args.prompt_len,
                    args.gen_len, args.repeats, args.decode_ctx)
        fwd_tok = args.batch * args.seq
        rows.append((dtype_name, f"forward {args.batch}x{args.seq} (s)", res[("forward_s", "ours")],
                     res[("forward_s", "transformers")], res[("forward_s", "ours")] / res[("forward_s", "transformers")],
                     f"{fwd_tok / res[('forward_s', 'ours')]:.0f} vs {fwd_tok / res[('forward_s', 'transformers')]:.0f} tok/s"))
        for b in gen_batches:
            k = f"gen_tok_s@{b}"
            rows.append((dtype_name, f"greedy gen b={b} (tok/s)", res[(k, "ours")], res[(k, "transformers")],
                         res[(k, "ours")] / res[(k, "transformers")], ""))
        if args.decode_ctx > 0:
            k, b = "decode_tok_s", max(gen_batches)
            rows.append((dtype_name, f"decode b={b} ctx={args.decode_ctx} (tok/s)", res[(k, "ours")],
                         res[(k, "transformers")], res[(k, "ours")] / res[(k, "transformers")], "model only, no generate()"))
        print(f"[{dtype_name}] max |logit diff| ours vs transformers: {diff:.2e}", flush=True)
        del ours, llama

    print(f"\nmedian of {args.repeats}, interleaved; threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'dtype':<9} {'measure':<26} {'ours':>9} {'transformers':>13} {'ours/tf':>8}  note")
    for d, name, a, b, r, note in rows:
        print(f"{d:<9} {name:<26} {a:>9.3f} {b:>13.3f} {r:>8.3f}  {note}")
    print("ratio: time (lower is better for ours) for forward; tok/s (higher is better for ours) for generation")


if __name__ == "__main__":
    main()
