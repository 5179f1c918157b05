"""The heterogeneous Llama: one block config per layer (Puzzle / DeciLM, model_type "nemotron-nas").

Each layer is an attention subblock and an FFN subblock, and each subblock is one variant:
  attention: full GQA attention with num_attention_heads // n_heads_in_group KV heads,
             a single Linear(hidden, hidden) ("replace_with_linear"), or nothing ("no_op");
  ffn:       SwiGLU of width ffn_mult_to_intermediate_size(ffn_mult), a single Linear, or nothing.
The config and weight names are NVIDIA's (Llama-3.3-Nemotron-Super-49B, Ultra-253B), so a child we
build loads in vLLM's DeciLMForCausalLM and in NVIDIA's HF modeling code. A config whose blocks all
equal the parent's is exactly LlamaForCausalLM (tests/test_model.py checks the logits).

kv_cache_dtype "fp8" stores K (after RoPE) and V in an FP8 E4M3 cache with one float32 scale per layer and tensor
(`self_attn.k_scale` / `v_scale`, the names vLLM and llm-compressor use), fake-quantized here; "auto" (default) keeps
them in the model's dtype.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# ----------------------------------------------------------------------------
# Block configs


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The width rule vLLM's nemotron_nas and NVIDIA's DeciLM code share: int(2*m*h/3) rounded up to 256."""
    i = int(2 * ffn_mult * hidden_size / 3)
    return -(-i // 256) * 256


def intermediate_size_to_ffn_mult(width: int, hidden_size: int) -> float:
    """The ffn_mult (6 decimals, as NVIDIA rounds it) that maps back to exactly `width`."""
    if width <= 0 or width % 256:
        raise ValueError(
            f"FFN width {width} is not a positive multiple of 256: the nemotron-nas format derives widths from "
            f"ffn_mult rounded up to a multiple of 256; pick a width in steps of 256"
        )
    m = round(3 * width / (2 * hidden_size), 6)
    for cand in (m, round(m + 1e-6, 6), round(m - 1e-6, 6)):
        if ffn_mult_to_intermediate_size(cand, hidden_size) == width:
            return cand
    raise ValueError(f"no 6-decimal ffn_mult maps to width {width} at hidden size {hidden_size}")


# Keys NVIDIA's block configs carry for features this repo does not implement; accepted while inactive.
_INACTIVE_KEYS = {"sparsify", "use_prefill_window_in_sink_attention", "unshifted_sink", "weight_groups",
                  "parallel_blocks", "llama4", "mamba", "moe"}


@dataclass
class AttentionConfig:
    """window_length W: a query sees the last W positions (itself included) and, with num_sink_tokens S, the first S
    positions of the sequence (gpt-oss-puzzle's window layers; NVIDIA's keys); the layer caches at most S + W - 1
    positions between steps. None: full causal attention."""
    n_heads_in_group: int | None = None
    no_op: bool = False
    replace_with_linear: bool = False
    window_length: int | None = None
    num_sink_tokens: int | None = None

    @property
    def has_kv_cache(self) -> bool:
        return not (self.no_op or self.replace_with_linear)


@dataclass
class FFNConfig:
    ffn_mult: float | None = None
    no_op: bool = False
    replace_with_linear: bool = False


@dataclass
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, d: dict, layer: int) -> "BlockConfig":
        if isinstance(d, BlockConfig):
            return d
        parts = {}
        for name, kind in (("attention", AttentionConfig), ("ffn", FFNConfig)):
            sub = dict(d.get(name) or {})
            known = {k: sub.pop(k) for k in list(sub) if k in kind.__dataclass_fields__}
            for k, v in sub.items():
                if k not in _INACTIVE_KEYS or v not in (None, False, [], {}):
                    raise ValueError(
                        f"layer {layer} {name}: unknown variant key {k}={v!r}; supported keys are "
                        f"{sorted(kind.__dataclass_fields__)} (fix block_configs[{layer}] in config.json)"
                    )
            parts[name] = kind(**known)
        return cls(**parts)

    def to_dict(self) -> dict:
        attention = {k: v for k, v in asdict(self.attention).items()  # window keys only where set: older configs
                     if k not in ("window_length", "num_sink_tokens") or v is not None}  # stay byte-identical
        return {"attention": attention, "ffn": asdict(self.ffn)}


def parent_block(n_heads_in_group: int, ffn_mult: float) -> BlockConfig:
    return BlockConfig(AttentionConfig(n_heads_in_group=n_heads_in_group), FFNConfig(ffn_mult=ffn_mult))


# ----------------------------------------------------------------------------
# Config

KV_CACHE_DTYPES = ("auto", "fp8")


@strict(accept_kwargs=True)
class DeciLMConfig(PreTrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    block_configs: list | None = None
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8": E4M3 with per-layer k_scale / v_scale

    def __post_init__(self, **kwargs):
        kwargs.pop("architectures", None)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one of {KV_CACHE_DTYPES}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.block_configs is None:  # a plain Llama-like default: full attention (MHA), ffn_mult 4
            self.block_configs = [parent_block(1, 4.0) for _ in range(self.num_hidden_layers)]
        if len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(f"block_configs has {len(self.block_configs)} entries but num_hidden_layers="
                             f"{self.num_hidden_layers}; give one block config per layer")
        self.block_configs = [BlockConfig.from_dict(b, i) for i, b in enumerate(self.block_configs)]
        for i, b in enumerate(self.block_configs):
            a, f = b.attention, b.ffn
            if a.no_op and a.replace_with_linear or f.no_op and f.replace_with_linear:
                raise ValueError(f"layer {i}: a subblock cannot be both no_op and replace_with_linear; pick one")
            if a.has_kv_cache:
                g = a.n_heads_in_group
                if not g or self.num_attention_heads % g:
                    divisors = [d for d in range(1, self.num_attention_heads + 1) if self.num_attention_heads % d == 0]
                    raise ValueError(f"layer {i}: n_heads_in_group={g} does not divide num_attention_heads="
                                     f"{self.num_attention_heads}; use one of {divisors}")
            if a.window_length is not None and (not a.has_kv_cache or a.window_length < 1):
                raise ValueError(f"layer {i}: window_length={a.window_length} needs full attention and W >= 1")
            if a.num_sink_tokens is not None and a.num_sink_tokens < 0:
                raise ValueError(f"layer {i}: num_sink_tokens={a.num_sink_tokens} must be >= 0")
            if a.num_sink_tokens and a.window_length is None:
                raise ValueError(f"layer {i}: num_sink_tokens={a.num_sink_tokens} needs a window_length")
            if not f.no_op and not f.replace_with_linear and not (f.ffn_mult and f.ffn_mult > 0):
                raise ValueError(f"layer {i}: ffn_mult={f.ffn_mult} must be > 0 for a SwiGLU FFN")
        super().__post_init__(**kwargs)
        self.architectures = ["DeciLMForCausalLM"]
        # Older loaders (NVIDIA's remote code, vLLM before rope_parameters) read rope_theta directly.
        self.rope_theta = self.rope_parameters["rope_theta"]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        if out.get("kv_cache_dtype") == "auto":  # written only when set: "auto" configs stay as they were
            del out["kv_cache_dtype"]
        return out

    def to_diff_dict(self):
        out = super().to_diff_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        if out.get("kv_cache_dtype") == "auto":
            del out["kv_cache_dtype"]
        return out

    def intermediate_size(self, layer: int) -> int:
        return ffn_mult_to_intermediate_size(self.block_configs[layer].ffn.ffn_mult, self.hidden_size)

    def num_kv_heads(self, layer: int) -> int:
        a = self.block_configs[layer].attention
        return self.num_attention_heads // a.n_heads_in_group if a.has_kv_cache else 0


# ----------------------------------------------------------------------------
# Modules


class DeciRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def compute_inv_freq(self):
        rope = self.config.rope_parameters
        if rope.get("rope_type", "default") == "default":
            d = self.config.head_dim
            return 1.0 / (rope["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d)), 1.0
        return ROPE_INIT_FUNCTIONS[rope["rope_type"]](self.config, None)  # llama3, yarn, ... as transformers does

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


FP8_E4M3_MAX = 448.0  # torch.float8_e4m3fn has no inf: its top code is this finite value


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x written to an FP8 E4M3 KV cache with a per-tensor scale and read back, in x's dtype:
    (x / scale).clamp(-448, 448) rounded to E4M3, times scale; float32 in between, as vLLM's cache kernels compute."""
    q = (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention with num_attention_heads // n_heads_in_group KV heads (SDPA, KV cache).

    With kv_cache_dtype "fp8", K (after RoPE: what is cached) and V are fake-quantized before they enter the cache and
    the attention, with the scalar float32 buffers k_scale / v_scale (saved in the checkpoint)."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, n_heads_in_group: int, window_length: int | None = None,
                 num_sink_tokens: int | None = None):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, config.head_dim
        self.window, self.sinks = window_length, num_sink_tokens or 0
        self.n_heads = config.num_attention_heads
        self.n_kv = self.n_heads // n_heads_in_group
        h, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=bias)
        self.kv_fp8 = False
        if config.kv_cache_dtype == "fp8":
            self.use_fp8_kv_cache()

    def use_fp8_kv_cache(self, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """Cache K and V in FP8 E4M3 with these per-tensor scales (1.0: unscaled, vLLM's default without scales)."""
        device = self.k_proj.weight.device
        self.register_buffer("k_scale", torch.tensor(float(k_scale), dtype=torch.float32, device=device))
        self.register_buffer("v_scale", torch.tensor(float(v_scale), dtype=torch.float32, device=device))
        self.kv_fp8 = True

    def qkv(self, x, rope):
        """Queries, keys and values (B, heads, T, head_dim), RoPE applied to q and k; full precision."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def forward(self, x, rope, mask=None, cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, rope)
        if self.kv_fp8:  # what an FP8 cache holds, used for this step's attention too
            k, v = fake_quant_kv(k, self.k_scale), fake_quant_kv(v, self.v_scale)
        if cache is not None:  # a window layer's cache keeps every row's sinks: it is told which tokens are real
            k, v = cache.update(k, v, self.layer_idx, *([{"real_tokens": real_tokens(mask)}] if self.window else []))
        if self.window is not None:
            mask = self.window_mask(cache, T, k.shape[-2], mask, x.device)
        gqa = self.n_kv != self.n_heads
        if gqa and mask is not None and x.device.type == "cuda":  # CUDA's masked SDPA kernels take no GQA: repeat
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


    def window_mask(self, cache, q_len: int, kv_len: int, mask, device):
        """Bool (B|1, 1, q, kv): key j is visible to query i when j <= i and, counting a row's real tokens only (its
        left padding holds no position, as position_ids count them), r_i - r_j < W or r_j < S (one of the row's first
        S tokens); the padding mask's columns are those of the keys the cache kept (absolute positions), so a padded
        row attends as it would alone."""
        layer = cache.layers[self.layer_idx] if cache is not None else None
        pos = layer.last_positions if isinstance(layer, WindowCacheLayer) else torch.arange(kv_len, device=device)
        causal = pos[None] <= pos[-q_len:, None]
        real = real_tokens(mask)
        r = pos[None] if real is None else (real.long().cumsum(-1) - 1)[:, pos]  # (B|1, kv): real-token index
        rq, rk = r[:, -q_len:, None], r[:, None, :]
        seen = causal & ((rq - rk < self.window) | (rk < self.sinks))  # (B|1, q, kv)
        return seen[:, None] if mask is None else mask[..., pos] & seen[:, None]  # mask columns: absolute positions


def real_tokens(mask):
    """(B, positions) bool, which cache positions hold real tokens, read off a (B, 1, q, kv) attention mask's last
    query row (that query, the newest token, sees every earlier real token); None without a mask (nothing padded)."""
    return None if mask is None else mask[:, 0, -1, :].bool()


class WindowCacheLayer(DynamicLayer):
    """The KV cache of a window layer: after each update it keeps the first S and the last W - 1 positions (all a
    later query can see), so it never holds more than S + W - 1; `last_positions`: the absolute positions of the keys
    the last update returned (kept + new), for the mask. get_seq_length() counts every token seen. In a left-padded
    batch (cache_kwargs "real_tokens", Attention passes it) the first S real tokens of every row are kept, so with
    sinks the cache may hold as many more positions as the rows' padding lengths differ."""

    def __init__(self, window_length: int, num_sink_tokens: int = 0):
        super().__init__()
        self.window, self.sinks, self.seen = window_length, num_sink_tokens, 0
        self.positions = self.last_positions = None

    def update(self, key_states, value_states, cache_kwargs=None, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.positions = torch.zeros(0, dtype=torch.long, device=key_states.device)
        new = torch.arange(self.seen, self.seen + key_states.shape[-2], device=key_states.device)
        self.seen += key_states.shape[-2]
        keys, values = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        self.last_positions = pos = torch.cat([self.positions, new])
        real = (cache_kwargs or {}).get("real_tokens")
        if real is None or not self.sinks:
            sink = pos < self.sinks
        else:  # a position that is one of the first S real tokens of any row
            sink = (real & (real.long().cumsum(-1) <= self.sinks)).any(0)[pos]
        keep = sink | (pos > self.seen - self.window)
        self.keys, self.values, self.positions = keys[:, :, keep], values[:, :, keep], pos[keep]
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen


class LinearAttention(nn.Module):
    """Attention replaced by one bias-free Linear(hidden, hidden) (Puzzle's linear replacement)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, rope=None, mask=None, cache=None):
        return self.linear_attn(x)


class MLP(nn.Module):
    """SwiGLU FFN: down(act(gate(x)) * up(x))."""

    def __init__(self, config: DeciLMConfig, intermediate_size: int):
        super().__init__()
        h, bias = config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearMLP(nn.Module):
    """FFN replaced by one bias-free Linear(hidden, hidden)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


def build_attention(config, layer_idx, attn: AttentionConfig):
    if attn.no_op:
        return None
    if attn.replace_with_linear:
        return LinearAttention(config)
    return Attention(config, layer_idx, attn.n_heads_in_group, attn.window_length, attn.num_sink_tokens)


def build_ffn(config, ffn: FFNConfig):
    if ffn.no_op:
        return None
    if ffn.replace_with_linear:
        return LinearMLP(config)
    return MLP(config, ffn_mult_to_intermediate_size(ffn.ffn_mult, config.hidden_size))


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(.)); a no_op subblock has neither module nor norm (NVIDIA's names)."""

    def __init__(self, config: DeciLMConfig, layer_idx: int):
        super().__init__()
        block = config.block_configs[layer_idx]
        self.self_attn = build_attention(config, layer_idx, block.attention)
        if self.self_attn is not None:
            self.input_layernorm = DeciRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = build_ffn(config, block.ffn)
        if self.mlp is not None:
            self.post_attention_layernorm = DeciRMSNorm(config.hidden_size, config.rms_norm_eps)

    def attn_delta(self, x, rope=None, mask=None, cache=None):
        """The attention subblock's contribution to the residual stream (what BLD trains)."""
        return self.self_attn(self.input_layernorm(x), rope, mask, cache)

    def ffn_delta(self, x):
        """The FFN subblock's contribution to the residual stream (what BLD and FFN Fusion use)."""
        return self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, rope=None, mask=None, cache=None):
        if self.self_attn is not None:
            x = x + self.attn_delta(x, rope, mask, cache)
        if self.mlp is not None:
            x = x + self.ffn_delta(x)
        return x


# ----------------------------------------------------------------------------
# Models


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    config: DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):  # a non-persistent buffer: recomputed, never loaded
            with torch.no_grad():
                module.inv_freq.copy_(module.compute_inv_freq()[0])
        if isinstance(module, Attention) and module.kv_fp8:  # FP8 KV scales absent from a checkpoint: unscaled
            with torch.no_grad():
                module.k_scale.fill_(1.0)
                module.v_scale.fill_(1.0)


def attention_mask_4d(attention_mask, q_len: int, past: int, dtype_device_ref):
    """Bool (B,1,q,past+q) mask from a 2D padding mask: causal by cache index, padded keys hidden.

    Returns None when nothing is padded and SDPA's own causal path applies (no past, or one query).
    A padded query may see itself, so no row is empty (an empty row gives NaN that leaks through 0*NaN).
    """
    if attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all())):
        if past == 0 or q_len == 1:
            return None
        attention_mask = torch.ones(1, past + q_len, dtype=torch.bool, device=dtype_device_ref.device)
    if attention_mask.dim() == 4:
        return attention_mask.bool()
    kv_len = attention_mask.shape[1]
    q_idx = torch.arange(past, past + q_len, device=attention_mask.device)[:, None]
    k_idx = torch.arange(kv_len, device=attention_mask.device)[None, :]
    mask = (k_idx <= q_idx)[None, None] & attention_mask.bool()[:, None, None, :]
    return mask | (k_idx == q_idx)[None, None]


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeciRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def use_window_cache_layers(self, cache) -> None:
        """Window layers cache in a WindowCacheLayer (at most S + W - 1 positions), whoever made the cache."""
        for i, b in enumerate(self.config.block_configs):
            a = b.attention
            if a.window_length is None or not a.has_kv_cache:
                continue
            while len(cache.layers) <= i:
                cache.layers.append(DynamicLayer())
            if not isinstance(cache.layers[i], WindowCacheLayer):
                if cache.layers[i].is_initialized:
                    raise ValueError(f"layer {i} is a window layer but its cache was filled as a full layer; start "
                                     f"from an empty cache")
                cache.layers[i] = WindowCacheLayer(a.window_length, a.num_sink_tokens or 0)

    def past_length(self, cache) -> int:
        """Tokens already cached, read from the first layer that keeps a KV cache (layer 0 may be no-op)."""
        if cache is None:
            return 0
        for i, b in enumerate(self.config.block_configs):
            if b.attention.has_kv_cache:
                return cache.get_seq_length(i) if len(cache.layers) > i else 0
        return 0

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, **kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cache = past_key_values if use_cache or past_key_values is not None else None
        if cache is not None:
            self.use_window_cache_layers(cache)
        past = self.past_length(cache)
        if position_ids is None:
            position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        rope = self.rotary_emb(x, position_ids)
        mask = attention_mask_4d(attention_mask, x.shape[1], past, x)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.norm(x)
        return x, cache, (tuple(hidden_states) if output_hidden_states else None)


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def load_all_weights(self, sd: dict, source: str) -> None:
        """Load a state dict that must hold every weight of this model (a tied LM head is the embedding's); a
        ValueError naming the first missing and unexpected names otherwise."""
        tied = self.config.tie_word_embeddings
        missing, unexpected = self.load_state_dict({k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")},
                                                   strict=False)
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"{source}: weight names differ from the model's: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                output_hidden_states=None, return_logits=True, loss_weights=None, **kwargs):
        """return_logits=False (training with labels): the LM head runs only where a label is set, e.g. on the
        assistant tokens of an SFT batch, and logits come back None. `loss_weights` (same shape as labels, that
        path only): the loss is the weighted mean of the token losses, sum(w * ce) / sum(w)."""
        h, cache, hidden_states = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                             inputs_embeds, use_cache, output_hidden_states)
        if labels is not None and not return_logits:
            target = labels[:, 1:]
            keep = target != -100
            ce = F.cross_entropy(self.lm_head(h[:, :-1][keep]).float(), target[keep], reduction="none")
            w = None if loss_weights is None else loss_weights[:, 1:][keep].float()
            loss = ce.mean() if w is None else (w * ce).sum() / w.sum()
            return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=cache if use_cache else None,
                                          hidden_states=hidden_states)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:  # next-token cross entropy, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None,
                                      hidden_states=hidden_states)


def num_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())
