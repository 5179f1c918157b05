"""FP8 (e4m3) quantization helpers and KV-cache byte accounting.

Two places in the recipe use FP8:
- generation: LN-Ultra's GRPO rollouts ran in vLLM with `quantization="fp8"` (BF16 weights
  converted to FP8 e4m3 at load, 1.8x faster generation). `fake_quantize_model_` lets a
  CPU run see the same weight rounding without FP8 kernels.
- the Puzzle MIP's memory constraint: weights + KV cache, the cache costing
  `tokens × 2 × n_kv × head_dim × bytes(kv_dtype)` per layer that keeps attention.
  LN-Super was searched for one H100 holding ~300K cached tokens at FP8.
"""

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448: e4m3 has no inf, so the top code is a finite value
AMAX_EPS = 1e-12  # an all-zero tensor or row still gets a finite scale

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


def quantize_fp8(x: torch.Tensor, per_channel: bool = False):
    """Absmax-scale `x` into e4m3. Returns (q, scale) with x ≈ q * scale.

    per_channel: one scale per output channel (dim 0, a Linear weight's rows), shaped to
    broadcast against x; otherwise one scalar scale. vLLM's fp8 weight path uses
    per-tensor scales; per-channel helps when rows differ a lot in magnitude.
    """
    x = x.float()
    if per_channel and x.dim() > 1:
        amax = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True)
    else:
        amax = x.abs().amax()
    scale = amax.clamp(min=AMAX_EPS) / FP8_MAX
    # Clamp before the cast: CPU saturates, but other backends turn overflow into NaN.
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def fake_quant_fp8(x: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """x rounded through FP8 and back, in x's dtype: what an FP8 model computes with."""
    q, scale = quantize_fp8(x, per_channel)
    return dequantize_fp8(q, scale, x.dtype)


@torch.no_grad()
def fake_quantize_model_(model: nn.Module, per_channel: bool = True) -> int:
    """Replace every nn.Linear weight by its FP8-rounded value, in place; returns the count.

    The LM head and embeddings stay in full precision, as in vLLM's fp8 mode (with tied
    embeddings the head shares the embedding's weight, so it is skipped by identity too).
    """
    keep = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        keep.add(id(head.weight))
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in keep or name.endswith("lm_head"):
            continue
        module.weight.copy_(fake_quant_fp8(module.weight, per_channel))
        count += 1
    return count


# ----------------------------------------------------------------------------
# KV-cache accounting (Puzzle §MIP memory constraint)

def _dtype_bytes(kv_dtype: str) -> int:
    if kv_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown kv dtype {kv_dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[kv_dtype]


def kv_bytes_per_token(n_kv_heads: int, head_dim: int, kv_dtype: str = "bf16") -> int:
    """Bytes one token costs in one attention layer's cache: K and V, each n_kv × head_dim."""
    return 2 * n_kv_heads * head_dim * _dtype_bytes(kv_dtype)


def kv_cache_bytes_per_layer(config, kv_dtype: str = "bf16") -> list:
    """Per-token KV bytes of each layer; 0 where attention is no_op or a linear (no cache)."""
    _dtype_bytes(kv_dtype)  # fail on a bad name even when no layer keeps attention
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out = []
    for block in config.block_configs:
        attn = block.attention
        if attn.no_op or attn.replace_with_linear:
            out.append(0)
        else:
            n_kv = config.num_attention_heads // attn.n_heads_in_group
            out.append(kv_bytes_per_token(n_kv, head_dim, kv_dtype))
    return out


def kv_cache_bytes(config, num_tokens: int, kv_dtype: str = "bf16") -> int:
    """Whole-model KV cache for num_tokens = batch × sequence cached tokens."""
    return num_tokens * sum(kv_cache_bytes_per_layer(config, kv_dtype))
