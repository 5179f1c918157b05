"""Quantization: FP8 E4M3 and NVFP4 fake quantization with a straight-through gradient, and KV-cache bytes.

Where the recipe quantizes:
- weights and activations of every attention / FFN projection: LN-Super/Ultra ship FP8 (E4M3, W8A8), Nemotron 3
  NVFP4 (E2M1 values in blocks of 16, an E4M3 scale per block, an FP32 scale per tensor). 04_distill.py --quant
  trains a model into its own fake-quantized copy (QAD: KL to the full-precision model only, temperature 1) and,
  at the same budget, the baselines PTQ (quantize once) and QAT (cross entropy on the data). Embeddings and the LM
  head stay in full precision: they are lookups / one matrix whose error every token sees, and neither vLLM's fp8
  mode nor NVIDIA's NVFP4 checkpoints quantize them.
- generation: LN-Ultra's GRPO rollouts ran in vLLM with `quantization="fp8"` (1.8x faster generation).
- the Puzzle MIP's memory constraint: weights + KV cache, the cache costing
  `tokens x 2 x n_kv x head_dim x bytes(kv_dtype)` per layer that keeps attention (fp8 halves it).

Fake quantization rounds a tensor to the values the format can hold and returns them in the tensor's dtype; a
model computing with them computes what the quantized model computes (up to the engine's accumulation order).
The gradient passes straight through (identity) inside the format's range and is zero where a static scale clips.
"""

import torch
import torch.nn.functional as F
from torch import nn

from common.text_corpus import distill_documents

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448: e4m3 has no inf, so the top code is a finite value
FP4_MAX = 6.0  # E2M1's largest magnitude
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes, code 0..7 (bit 3 is the sign)
NVFP4_BLOCK = 16  # values sharing one E4M3 scale
AMAX_EPS = 1e-12  # an all-zero tensor, row or block still gets a finite scale
FORMATS = ("fp8", "nvfp4")

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


# ----------------------------------------------------------------------------
# Rounding to the formats' grids (float32 in, float32 out)


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest E4M3 value (ties to even, saturating at +-448), as float32."""
    # clamp before the cast: CPU saturates, but other backends turn overflow into NaN
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest E2M1 value (ties to even mantissa, as the hardware's cvt.rn), saturating at +-6.

    E2M1 steps are 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]; torch.round's half-to-even on x / step picks the
    even mantissa at every tie (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4)."""
    a = x.float().abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.sign(x.float()) * (torch.round(a / step) * step).clamp(max=FP4_MAX)


# ----------------------------------------------------------------------------
# FP8 E4M3: one scale per output channel (weights) or per token (dynamic activations)


def quantize_fp8(x: torch.Tensor, per_channel: bool = False):
    """Absmax-scale `x` into e4m3. Returns (q, scale) with x ~ q * scale.

    per_channel: one scale per row (dim 0, a Linear weight's output channels), shaped to broadcast against x;
    otherwise one scalar scale."""
    x = x.float()
    if per_channel and x.dim() > 1:
        amax = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True)
    else:
        amax = x.abs().amax()
    scale = amax.clamp(min=AMAX_EPS) / FP8_MAX
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def fake_quant_fp8(x: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """x rounded through FP8 and back, in x's dtype: what an FP8 model computes with."""
    q, scale = quantize_fp8(x, per_channel)
    return dequantize_fp8(q, scale, x.dtype)


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token activation quantization (vLLM's fp8 'dynamic' scheme): one scale per row of the last dim."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_EPS) / FP8_MAX
    return (e4m3_round(xf * (1.0 / scale)) * scale).to(x.dtype)  # x * (1 / s), as vLLM's kernel: rounds alike at ties


# ----------------------------------------------------------------------------
# NVFP4: E2M1 values in blocks of 16 along the last dim, an E4M3 scale per block, an FP32 scale per tensor


def nvfp4_global_scale(amax) -> torch.Tensor:
    """The FP32 per-tensor scale: it maps the tensor's amax onto the largest block scale x value (448 x 6)."""
    return torch.as_tensor(amax, dtype=torch.float32).clamp(min=AMAX_EPS) / (FP8_MAX * FP4_MAX)


def quantize_nvfp4(x: torch.Tensor, amax=None):
    """(values, block_scale, global_scale) with x ~ values * block_scale * global_scale.

    values: float32 on the E2M1 grid, x's shape; block_scale: float32 on the E4M3 grid, shape (..., n / 16);
    global_scale: float32 scalar from `amax` (a calibrated static amax; default the tensor's own). The last dim must
    be a multiple of 16. Values beyond a static amax saturate at +-6 x their block scale."""
    if x.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs a last dim divisible by {NVFP4_BLOCK}, got shape {tuple(x.shape)}")
    xf = x.float()
    g = nvfp4_global_scale(xf.abs().amax() if amax is None else amax)
    blocks = xf.reshape(*xf.shape[:-1], -1, NVFP4_BLOCK)
    block_scale = e4m3_round(blocks.abs().amax(dim=-1) / (FP4_MAX * g))
    safe = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))  # an all-zero block stays zero
    values = e2m1_round(blocks / (safe * g).unsqueeze(-1))
    return values.reshape(xf.shape), block_scale, g


def dequantize_nvfp4(values, block_scale, global_scale, dtype=torch.float32) -> torch.Tensor:
    blocks = values.float().reshape(*values.shape[:-1], -1, NVFP4_BLOCK)
    return (blocks * (block_scale * global_scale).unsqueeze(-1)).reshape(values.shape).to(dtype)


def fake_quant_nvfp4(x: torch.Tensor, amax=None) -> torch.Tensor:
    return dequantize_nvfp4(*quantize_nvfp4(x, amax), dtype=x.dtype)


# ----------------------------------------------------------------------------
# Straight-through fake quantization of Linear layers


def straight_through(x: torch.Tensor, xq: torch.Tensor, limit=None) -> torch.Tensor:
    """xq in the forward, the identity's gradient in the backward (zero where |x| > limit: clipped by a static
    scale, so no gradient can pull the value back into range)."""
    out = x + (xq - x).detach()
    if limit is not None:
        inside = (x.abs() <= limit).to(x.dtype)
        out = out * inside + (out * (1 - inside)).detach()
    return out


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # what vLLM runs as one Linear (qkv, gate_up)


def fake_quant_weight(w: torch.Tensor, fmt: str, amax=None) -> torch.Tensor:
    """A Linear weight (out, in) as the format stores it: fp8 per output channel, nvfp4 in blocks along `in` with
    the per-tensor scale from `amax` (default the weight's own; a fused group's shared amax where vLLM fuses)."""
    if fmt == "fp8":
        return fake_quant_fp8(w, per_channel=True)
    if fmt == "nvfp4":
        return fake_quant_nvfp4(w, amax)
    raise ValueError(f"unknown quantization format {fmt!r}: expected one of {FORMATS}")


def fake_quant_act(x: torch.Tensor, fmt: str, amax=None) -> torch.Tensor:
    """An activation as the format's kernels see it: fp8 with a dynamic per-token scale; nvfp4 in blocks of 16
    with a per-tensor scale from the calibrated `amax` (dynamic when None)."""
    if fmt == "fp8":
        return fake_quant_fp8_per_token(x)
    if fmt == "nvfp4":
        return fake_quant_nvfp4(x, amax)
    raise ValueError(f"unknown quantization format {fmt!r}: expected one of {FORMATS}")


class QuantLinear(nn.Linear):
    """nn.Linear computing with fake-quantized weights (and activations, when `quant_acts`), gradients straight
    through to the full-precision master weights. Same parameters and state-dict keys as the Linear it replaces.

    Without gradients (evaluation, generation) the rounded weight is computed once and reused until the weight
    changes."""

    fmt: str = "fp8"
    quant_acts: bool = True
    act_amax: float | None = None  # calibrated input amax (nvfp4's static per-tensor activation scale)

    def group_amax(self):
        """NVFP4's per-tensor amax: the largest over the Linears vLLM fuses with this one (q/k/v, gate/up share one
        global scale when served), so the model trained and evaluated here is the model served."""
        group = self.__dict__.get("_group") or (self,)
        return torch.stack([m.weight.detach().abs().max().float() for m in group]).max()

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        amax = self.group_amax() if self.fmt == "nvfp4" else None
        if torch.is_grad_enabled() and w.requires_grad:
            return straight_through(w, fake_quant_weight(w, self.fmt, amax))
        key = tuple((m.weight.data_ptr(), m.weight._version, m.weight.dtype) for m in self.__dict__.get("_group") or (self,))
        if getattr(self, "_wq_key", None) != key:
            self._wq, self._wq_key = fake_quant_weight(w.detach(), self.fmt, amax), key
        return self._wq

    def forward(self, x):
        if self.quant_acts:
            xq = fake_quant_act(x.detach(), self.fmt, self.act_amax)
            limit = self.act_amax if self.fmt == "nvfp4" and self.act_amax is not None else None
            x = straight_through(x, xq, limit) if torch.is_grad_enabled() else xq
        return F.linear(x, self.quantized_weight(), self.bias)


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every Linear the formats quantize: attention and FFN projections (the linear replacements
    included); not the LM head, not an embedding (tied or not)."""
    keep = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        keep.add(id(head.weight))
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in keep and not n.endswith("lm_head")]


def quantize_model_(model: nn.Module, fmt: str, quant_acts: bool = True) -> int:
    """Make every quantizable Linear a QuantLinear of `fmt`, in place (the parameters are shared, not copied);
    returns the count. Undo with dequantize_model_."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}: expected one of {FORMATS}")
    linears = quantizable_linears(model)
    for _, m in linears:
        if fmt == "nvfp4" and m.in_features % NVFP4_BLOCK:
            raise ValueError(f"NVFP4 needs in_features divisible by {NVFP4_BLOCK}; a Linear has {m.in_features}")
        m.__class__ = QuantLinear  # same object, same parameters: optimizers, DDP and state dicts see no change
        m.fmt, m.quant_acts, m.act_amax = fmt, quant_acts, None
    by_name = dict(linears)
    for name, m in linears:  # siblings vLLM fuses (a plain list in __dict__: not registered as submodules)
        parent, _, leaf = name.rpartition(".")
        group = next((g for g in FUSED if leaf in g), (leaf,))
        m.__dict__["_group"] = [by_name[f"{parent}.{g}"] for g in group if f"{parent}.{g}" in by_name]
    return len(linears)


def dequantize_model_(model: nn.Module) -> int:
    """QuantLinears back to nn.Linear (master weights unchanged); returns the count."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.__class__ = nn.Linear
            for attr in ("fmt", "quant_acts", "act_amax", "_wq", "_wq_key", "_group"):
                m.__dict__.pop(attr, None)
            n += 1
    return n


@torch.no_grad()
def calibrate_act_amax(model: nn.Module, batches) -> int:
    """Each QuantLinear's input amax over the calibration batches (input ids), set as its static activation
    scale; returns the number of layers calibrated. Run on text disjoint from the evaluation text."""
    def observe(mod, inp):
        amax[mod] = max(amax.get(mod, 0.0), inp[0].detach().abs().max().item())

    saved = {m: m.quant_acts for m in model.modules() if isinstance(m, QuantLinear)}
    amax, hooks = {}, [m.register_forward_pre_hook(observe) for m in saved]
    for m in saved:
        m.quant_acts = False  # observe the full-precision inputs
    try:
        for ids in batches:
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for m, q in saved.items():
            m.quant_acts = q
    for m, a in amax.items():
        m.act_amax = a
    return len(amax)


def restore_quantized_(model: nn.Module, quant: dict) -> nn.Module:
    """A checkpoint's meta.json "quant" ({"format", "quant_acts", "act_amax": {module name: amax}}, written by
    04_distill.py --quant) applied to the model loaded from it: the fake-quantized model that was evaluated."""
    quantize_model_(model, quant["format"], quant.get("quant_acts", True))
    modules = dict(model.named_modules())
    for name, amax in (quant.get("act_amax") or {}).items():
        modules[name].act_amax = amax
    return model


@torch.no_grad()
def fake_quantize_model_(model: nn.Module, per_channel: bool = True) -> int:
    """Replace every quantizable Linear weight by its FP8-rounded value, in place (weights only); returns the count."""
    linears = quantizable_linears(model)
    for _, m in linears:
        m.weight.copy_(fake_quant_fp8(m.weight, per_channel))
    return len(linears)


# ----------------------------------------------------------------------------
# KV-cache accounting (Puzzle's MIP memory constraint)


def _dtype_bytes(kv_dtype: str) -> int:
    if kv_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown kv dtype {kv_dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[kv_dtype]


def kv_bytes_per_token(n_kv_heads: int, head_dim: int, kv_dtype: str = "bf16") -> int:
    """Bytes one token costs in one attention layer's cache: K and V, each n_kv x head_dim. A whole model's cache
    (window layers count min(tokens, W + S) positions): common.variants.kv_cache_bytes."""
    return 2 * n_kv_heads * head_dim * _dtype_bytes(kv_dtype)


# ----------------------------------------------------------------------------
# FP8 KV cache
#
# One float32 scale per layer for K and one for V (gpt-oss-puzzle's calibrated FP8 KV cache): the amax of the
# post-RoPE keys (what is cached) and of the values on calibration text, / 448, so the largest calibration value
# lands on E4M3's top code. The model runs with kv_cache_dtype "fp8" (common/model.py: Attention fake-quantizes K and
# V with its k_scale / v_scale buffers), so the accuracy cost is measured on any CPU. The scales are saved as
# model.layers.{i}.self_attn.k_scale / v_scale, the names llm-compressor writes and vLLM's
# maybe_remap_kv_scale_name maps onto its Attention (self_attn.attn.k_scale). Without scales vLLM uses 1.0
# ("unscaled FP8": set_kv_cache_fp8_ with no scales reproduces it).
#
#     python -m common.quant kv-calibrate --model runs/smol/parent --out runs/smol/parent_kv_fp8
#     python -m common.quant kv-calibrate --model runs/smol/parent --out runs/smol/parent_kv_fp8_unscaled --unscaled


def kv_attention_modules(model: nn.Module) -> list:
    """The full-attention modules (those that keep a KV cache), in layer order."""
    from common.model import Attention
    return sorted((m for m in getattr(model, "module", model).modules() if isinstance(m, Attention)),
                  key=lambda m: m.layer_idx)


@torch.no_grad()
def calibrate_kv_scales(model: nn.Module, batches) -> tuple[list, list]:
    """(k_scales, v_scales), one entry per layer: amax over the calibration batches (input ids) of the post-RoPE keys
    and of the values, / 448; None for a layer without attention (no-op or a linear: no cache). The full-precision
    K and V are observed, also in a model already running an FP8 cache. Run on text disjoint from the evaluation text."""
    attn = kv_attention_modules(model)
    n = model.config.num_hidden_layers
    kmax, vmax = [None] * n, [None] * n

    def observe(mod, args):  # DecoderLayer calls self_attn(x, rope, mask, cache)
        _, k, v = mod.qkv(args[0], args[1])
        i = mod.layer_idx
        kmax[i] = max(kmax[i] or 0.0, k.detach().abs().max().float().item())
        vmax[i] = max(vmax[i] or 0.0, v.detach().abs().max().float().item())

    hooks = [m.register_forward_pre_hook(observe) for m in attn]
    device, seen = next(model.parameters()).device, 0
    try:
        for ids in batches:
            model(ids.to(device), use_cache=False)
            seen += 1
    finally:
        for h in hooks:
            h.remove()
    if attn and not seen:
        raise ValueError("calibrate_kv_scales: no calibration batches; give at least one batch of input ids")

    def scales(amax):
        return [None if a is None else max(a, AMAX_EPS) / FP8_MAX for a in amax]
    return scales(kmax), scales(vmax)


def set_kv_cache_fp8_(model: nn.Module, k_scales: list | None = None, v_scales: list | None = None) -> int:
    """Switch a loaded model to an FP8 (E4M3) KV cache in place: config.kv_cache_dtype = "fp8" and each attention
    layer's k_scale / v_scale buffers set (per-layer lists as calibrate_kv_scales returns; None = scale 1, vLLM's
    "unscaled FP8" when a checkpoint carries no scales). Returns the number of attention layers."""
    attn = kv_attention_modules(model)
    n = model.config.num_hidden_layers
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if scales is None:
            continue
        if len(scales) != n:
            raise ValueError(f"{name} has {len(scales)} entries but the model has {n} layers; give one per layer")
        bad = [m.layer_idx for m in attn if scales[m.layer_idx] is None or not 0 < scales[m.layer_idx] < float("inf")]
        if bad:
            raise ValueError(f"{name}: attention layers {bad} have no positive finite scale; calibrate them")
    for m in attn:
        i = m.layer_idx
        m.use_fp8_kv_cache(1.0 if k_scales is None else k_scales[i], 1.0 if v_scales is None else v_scales[i])
    model.config.kv_cache_dtype = "fp8"
    return len(attn)


def kv_calibration_chunks(tokenizer, num_tokens: int, seq_len: int) -> torch.Tensor:
    """(n, seq_len) token ids of calibration text, n = max(1, num_tokens // seq_len): the distillation mix
    (common.text_corpus "train", disjoint by document from the evaluation suite's held-out text) packed by text_chunks,
    n chunks evenly spaced over it so that pydoc topics and module docstrings both calibrate."""
    from common.data import text_chunks

    chunks = text_chunks(tokenizer, distill_documents("train"), seq_len)
    n = max(1, num_tokens // seq_len)
    if n > len(chunks):
        raise ValueError(f"the calibration text has {len(chunks)} chunks of {seq_len} tokens, fewer than the {n} "
                         f"asked for; lower --calib-tokens or --seq-len")
    return chunks[torch.linspace(0, len(chunks) - 1, n).round().long().unique()]


def kv_calibrate_main(argv=None) -> None:
    """`python -m common.quant kv-calibrate`: a copy of --model with an FP8 KV cache and calibrated scales."""
    import argparse
    import os
    import time

    from common.checkpoint import CheckpointError, check_checkpoint, check_out_free, load_checkpoint, save_checkpoint
    from common.cli import die, positive_int

    p = argparse.ArgumentParser(prog="python -m common.quant kv-calibrate",
                                description="Write a copy of a checkpoint whose KV cache is FP8 E4M3 with per-layer "
                                            "K / V scales calibrated on the distillation text (amax / 448)")
    p.add_argument("--model", required=True, help="input checkpoint directory")
    p.add_argument("--out", required=True, help="new checkpoint directory (must not exist)")
    p.add_argument("--unscaled", action="store_true", help="no calibration: every scale 1.0 (vLLM's FP8 KV cache "
                                                           "for a checkpoint without scales), the baseline")
    p.add_argument("--calib-tokens", type=positive_int, default=16384, help="calibration tokens")
    p.add_argument("--seq-len", type=positive_int, default=512, help="calibration sequence length")
    p.add_argument("--batch-size", type=positive_int, default=8, help="calibration sequences per forward")
    args = p.parse_args(argv)
    try:  # everything checked before anything is loaded or written
        check_checkpoint(args.model)
        check_out_free(args.out)
    except CheckpointError as e:
        die(str(e))

    t0 = time.perf_counter()
    try:
        model, tokenizer = load_checkpoint(args.model, dtype=torch.float32)  # amax in float32
    except CheckpointError as e:
        die(str(e))
    k_scales = v_scales = None
    data = None
    if not args.unscaled:
        try:
            chunks = kv_calibration_chunks(tokenizer, args.calib_tokens, args.seq_len)
        except ValueError as e:
            die(str(e))
        k_scales, v_scales = calibrate_kv_scales(model, chunks.split(args.batch_size))
        data = {"text": 'common.text_corpus.distill_documents("train")', "sequences": len(chunks), "seq_len": args.seq_len,
                "tokens": chunks.numel()}
    n = set_kv_cache_fp8_(model, k_scales, v_scales)
    scales = {"k_scale": k_scales, "v_scale": v_scales} if k_scales is not None else "1.0 (unscaled)"
    out = save_checkpoint(model, tokenizer, args.out, stage="kv_fp8", args=vars(args),
                          meta={"parent": os.path.abspath(args.model), "input": os.path.abspath(args.model),
                                "kv_cache": {"dtype": "fp8_e4m3", "scales": scales, "calibration": data}})
    print(f"{'layer':>5}{'k_scale':>12}{'v_scale':>12}   (amax / 448)")
    for m in kv_attention_modules(model):
        print(f"{m.layer_idx:>5}{m.k_scale.item():>12.5g}{m.v_scale.item():>12.5g}")
    how = "unscaled" if args.unscaled else f"{data['tokens']} calibration tokens"
    print(f"kv_fp8: {n} attention layers, {how}, {time.perf_counter() - t0:.0f}s -> {out}")


if __name__ == "__main__":
    import sys
    if len(sys.argv) < 2 or sys.argv[1] != "kv-calibrate":
        sys.exit("usage: python -m common.quant kv-calibrate --model CKPT --out OUT [--unscaled] [--calib-tokens N] "
                 "[--seq-len L]")
    kv_calibrate_main(sys.argv[2:])
