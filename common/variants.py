"""Puzzle's subblock variants, one entry per kind: everything a stage needs to know about a kind lives here.

    attention  gqa      the parent's attention, or fewer KV heads (mean-pooled)    kv3, kv1
               window   the parent's attention over the last W tokens + S sinks   kv3-win64, kv3-win64-s4
               linear   one bias-free Linear(hidden, hidden)                      linear
               no_op    nothing                                                   no_op
    ffn        swiglu   the parent's width, or narrower (top channels)            w1536, w1024
               linear   one bias-free Linear(hidden, hidden)                      linear
               no_op    nothing                                                   no_op

Each kind (a VariantKind below, one instance in KINDS) says, for a config (AttentionConfig / FFNConfig, or its dict):
  matches(cfg)                            whether the config is this kind
  name(config, cfg)                       its name in the block library
  candidates(config, parent_cfg, opts)    the variants of this kind 01 adds to a layer's search space (01's flags)
  build(config, layer, cfg)               its module (common/model.py's build functions: the shipped model code
                                          cannot import this file; None for no_op)
  init(config, cfg, parent, calib, ...)   its weights from the parent layer's subblock (01; Puzzletron's inits)
  params(config, cfg)                     its parameters, its RMSNorm included (= num_params of the built module)
  kv_heads / kv_positions(cfg, tokens)    its KV cache: heads, and positions cached per sequence of `tokens` tokens
  stock_vllm(layer, cfg) / plugin_vllm    whether stock vLLM's nemotron_nas / the repo's plugin (vllm_plugin/) serve it
Every stage asks through the functions at the bottom (kind_of, build_subblock, init_subblock, subblock_params,
kv_bytes, stock_vllm_serves, ...): 01 builds, initializes and prices the library, 02 prices memory, common/costs.py
times the built modules, common/evaluate.py counts KV bytes. Adding a kind is one class here plus its tests (and its
module in common/model.py and, to serve it, vllm_plugin/).
"""

from dataclasses import asdict

import torch

from common.model import (AttentionConfig, FFNConfig, build_attention, build_ffn, ffn_mult_to_intermediate_size,
                          intermediate_size_to_ffn_mult)

SUBBLOCKS = ("attention", "ffn")
CONFIG_CLASSES = {"attention": AttentionConfig, "ffn": FFNConfig}
_OPTIONAL_KEYS = ("window_length", "num_sink_tokens")  # written only where set (as BlockConfig.to_dict does)


def config_from_dict(subblock: str, cfg):
    """An AttentionConfig / FFNConfig from its dict (library.json, config.json's block_configs), or the config itself;
    keys the dataclass lacks (NVIDIA's inactive ones, which DeciLMConfig validates) are dropped."""
    cls = CONFIG_CLASSES[subblock]
    if isinstance(cfg, cls):
        return cfg
    return cls(**{k: v for k, v in cfg.items() if k in cls.__dataclass_fields__})  # config.json: NVIDIA's other keys


def config_to_dict(cfg) -> dict:
    """The config as library.json stores it: the window keys only where set, so other variants read as they did."""
    return {k: v for k, v in asdict(cfg).items() if k not in _OPTIONAL_KEYS or v is not None}


def window_positions(tokens, window_length: int, num_sink_tokens: int | None = None):
    """Positions a window layer caches for a sequence of `tokens` tokens: min(tokens, W + S) (NVIDIA Puzzletron's
    rule; between steps our cache keeps S + W - 1, during a step W + S)."""
    return min(tokens, window_length + (num_sink_tokens or 0))


# ----------------------------------------------------------------------------
# The kinds


class VariantKind:
    subblock: str
    kind: str

    def matches(self, cfg) -> bool:
        raise NotImplementedError

    def name(self, config, cfg) -> str:
        return self.kind

    def candidates(self, config, parent_cfg, opts: dict) -> list:
        """Configs of this kind 01 adds to every layer besides the parent's (opts: 01's search-space flags)."""
        return []

    def build(self, config, layer: int, cfg):
        return build_attention(config, layer, cfg) if self.subblock == "attention" else build_ffn(config, cfg)

    def init(self, config, cfg, parent: dict, calib: dict, linear_init: str) -> dict:
        """The module's weights (DecoderLayer key names, norm excluded) from the parent's subblock state `parent`;
        `calib`: 01's calibration statistics of this layer (FFN channel activations, least-squares moments)."""
        raise NotImplementedError

    def params(self, config, cfg) -> int:
        raise NotImplementedError

    def kv_heads(self, config, cfg) -> int:
        return 0

    def kv_positions(self, cfg, tokens):
        return 0

    def stock_vllm(self, layer: int, cfg) -> bool:
        return True

    def plugin_vllm(self, layer: int, cfg) -> bool:
        return True


class GQA(VariantKind):
    """Full causal attention with num_attention_heads // n_heads_in_group KV heads; fewer KV heads than the parent's
    start from its K/V heads mean-pooled in consecutive groups (Puzzletron)."""
    subblock, kind = "attention", "gqa"

    def matches(self, cfg):
        return not (cfg.no_op or cfg.replace_with_linear) and cfg.window_length is None

    def name(self, config, cfg):
        return f"kv{self.kv_heads(config, cfg)}"

    def candidates(self, config, parent_cfg, opts):
        H, parent_kv = config.num_attention_heads, config.num_attention_heads // parent_cfg.n_heads_in_group
        out = []
        for kv in sorted(set(opts.get("kv_heads", ())), reverse=True):
            if kv >= parent_kv or H % kv or parent_kv % kv:
                raise ValueError(f"--kv-heads {kv}: must be fewer than the parent's {parent_kv} KV heads and divide "
                                 f"both {H} query heads and {parent_kv} (mean-pooled groups); valid: "
                                 f"{[d for d in range(1, parent_kv) if parent_kv % d == 0 and H % d == 0]}")
            out.append(AttentionConfig(n_heads_in_group=H // kv))
        return out

    def init(self, config, cfg, parent, calib, linear_init):
        d, h = config.head_dim, config.hidden_size
        kv = self.kv_heads(config, cfg)
        new = {f"self_attn.{k}.weight": parent[f"self_attn.{k}.weight"] for k in ("q_proj", "o_proj")}
        for k in ("k_proj", "v_proj"):
            w = parent[f"self_attn.{k}.weight"].view(-1, d, h)
            new[f"self_attn.{k}.weight"] = w.view(kv, w.shape[0] // kv, d, h).mean(1).reshape(kv * d, h)
        return new

    def params(self, config, cfg):
        h, d, H = config.hidden_size, config.head_dim, config.num_attention_heads
        return 2 * h * H * d + 2 * h * self.kv_heads(config, cfg) * d + h

    def kv_heads(self, config, cfg):
        return config.num_attention_heads // cfg.n_heads_in_group

    def kv_positions(self, cfg, tokens):
        return tokens


class Window(GQA):
    """The parent's attention restricted to the last W tokens (+ the first S, sinks): gpt-oss-puzzle's window layers.
    Its weights start as the parent attention's, unchanged (its KV heads; mean-pooled if fewer); its cache holds
    min(tokens, W + S) positions per sequence. vLLM serves it as a per-layer sliding window (the plugin; stock
    nemotron_nas ignores the key and would attend to everything); no vLLM kernel keeps sink tokens."""
    kind = "window"

    def matches(self, cfg):
        return not (cfg.no_op or cfg.replace_with_linear) and cfg.window_length is not None

    def name(self, config, cfg):
        return f"kv{self.kv_heads(config, cfg)}-win{cfg.window_length}" + (
            f"-s{cfg.num_sink_tokens}" if cfg.num_sink_tokens else "")

    def candidates(self, config, parent_cfg, opts):
        sinks = opts.get("window_sinks", 0)
        if sinks < 0:
            raise ValueError(f"--window-sinks {sinks}: must be >= 0")
        out = []
        for w in sorted(set(opts.get("window_sizes", ()))):
            if w < 1:
                raise ValueError(f"--window-sizes {w}: a window holds at least 1 token")
            out.append(AttentionConfig(n_heads_in_group=parent_cfg.n_heads_in_group, window_length=w,
                                       num_sink_tokens=sinks or None))
        return out

    def kv_positions(self, cfg, tokens):
        return window_positions(tokens, cfg.window_length, cfg.num_sink_tokens)

    def stock_vllm(self, layer, cfg):
        return False

    def plugin_vllm(self, layer, cfg):
        return not cfg.num_sink_tokens


class LinearSubblock(VariantKind):
    """One bias-free Linear(hidden, hidden) (Puzzle's linear replacement), fit by least squares to the parent
    subblock's output on calibration text, or taken from the weights: attention W_o @ W_v (each token attending only
    to itself), FFN W_down @ W_up (gate ignored). Keeps no KV cache; stock vLLM does not serve it, the plugin does."""
    kind = "linear"

    def __init__(self, subblock):
        self.subblock = subblock

    def matches(self, cfg):
        return cfg.replace_with_linear

    def candidates(self, config, parent_cfg, opts):
        return [CONFIG_CLASSES[self.subblock](replace_with_linear=True)] if opts.get("linear", True) else []

    def init(self, config, cfg, parent, calib, linear_init):
        key = "self_attn.linear_attn.weight" if self.subblock == "attention" else "mlp.linear_mlp.weight"
        if linear_init == "lstsq":
            return {key: lstsq_weight(calib[self.subblock + "_xtx"], calib[self.subblock + "_xty"])}
        if self.subblock == "ffn":
            return {key: parent["mlp.down_proj.weight"] @ parent["mlp.up_proj.weight"]}
        H, d = config.num_attention_heads, config.head_dim  # KV heads repeated to the query heads
        wv = parent["self_attn.v_proj.weight"].view(-1, d, config.hidden_size)
        wv = wv.repeat_interleave(H // wv.shape[0], dim=0).reshape(H * d, -1)
        return {key: parent["self_attn.o_proj.weight"] @ wv}

    def params(self, config, cfg):
        return config.hidden_size ** 2 + config.hidden_size

    def stock_vllm(self, layer, cfg):
        return False


class NoOp(VariantKind):
    """Nothing: no module, no norm, no weights, no cache. Stock vLLM serves it except as layer 0's attention (its
    first FFN norm gets no residual); the plugin serves that too."""
    kind = "no_op"

    def __init__(self, subblock):
        self.subblock = subblock

    def matches(self, cfg):
        return cfg.no_op

    def candidates(self, config, parent_cfg, opts):
        return [CONFIG_CLASSES[self.subblock](no_op=True)] if opts.get("no_op", True) else []

    def build(self, config, layer, cfg):
        return None

    def init(self, config, cfg, parent, calib, linear_init):
        return None

    def params(self, config, cfg):
        return 0

    def stock_vllm(self, layer, cfg):
        return not (self.subblock == "attention" and layer == 0)


class SwiGLU(VariantKind):
    """SwiGLU FFN of width ffn_mult_to_intermediate_size(ffn_mult) (a multiple of 256); a narrower one keeps the
    parent's top channels by ||W_down[:, j]|| * mean |a_j| on calibration text (Puzzletron)."""
    subblock, kind = "ffn", "swiglu"

    def matches(self, cfg):
        return not (cfg.no_op or cfg.replace_with_linear)

    def name(self, config, cfg):
        return f"w{self.width(config, cfg)}"

    def width(self, config, cfg):
        return ffn_mult_to_intermediate_size(cfg.ffn_mult, config.hidden_size)

    def candidates(self, config, parent_cfg, opts):
        parent_w = self.width(config, parent_cfg)
        out = []
        for w in sorted(set(opts.get("ffn_widths", ())), reverse=True):
            if w >= parent_w:
                raise ValueError(f"--ffn-widths {w}: must be narrower than the parent's FFN width {parent_w}")
            out.append(FFNConfig(ffn_mult=intermediate_size_to_ffn_mult(w, config.hidden_size)))
        return out

    def init(self, config, cfg, parent, calib, linear_init):
        score = parent["mlp.down_proj.weight"].float().norm(dim=0) * (calib["act"] / max(1, calib["n"]))
        keep = score.topk(self.width(config, cfg)).indices.sort().values
        return {"mlp.gate_proj.weight": parent["mlp.gate_proj.weight"][keep],
                "mlp.up_proj.weight": parent["mlp.up_proj.weight"][keep],
                "mlp.down_proj.weight": parent["mlp.down_proj.weight"][:, keep]}

    def params(self, config, cfg):
        return 3 * config.hidden_size * self.width(config, cfg) + config.hidden_size


KINDS = {"attention": [GQA(), Window(), LinearSubblock("attention"), NoOp("attention")],
         "ffn": [SwiGLU(), LinearSubblock("ffn"), NoOp("ffn")]}


def lstsq_weight(xtx, xty):
    """The W minimizing ||X W^T - Y||^2 (+ a small ridge) from the moments X^T X, X^T Y."""
    ridge = 1e-4 * torch.trace(xtx) / xtx.shape[0]
    return torch.linalg.solve(xtx + ridge * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device), xty).T.float()


# ----------------------------------------------------------------------------
# What the stages call


def kind_of(subblock: str, cfg) -> VariantKind:
    cfg = config_from_dict(subblock, cfg)
    for kind in KINDS[subblock]:
        if kind.matches(cfg):
            return kind
    raise ValueError(f"no {subblock} variant kind matches {cfg}")


def variant_name(config, subblock: str, cfg) -> str:
    return kind_of(subblock, cfg).name(config, config_from_dict(subblock, cfg))


def search_space(config, subblock: str, **opts) -> list:
    """[{name, config, parent}] of one subblock for every layer: the parent's own variant first (the homogeneous
    parent's layer 0), then each kind's candidates in KINDS order. opts: kv_heads, window_sizes, window_sinks,
    ffn_widths (lists), linear, no_op (bools), as 01's flags give them."""
    parent_cfg = getattr(config.block_configs[0], subblock)
    out = [{"name": variant_name(config, subblock, parent_cfg), "config": parent_cfg, "parent": True}]
    for kind in KINDS[subblock]:
        for cfg in kind.candidates(config, parent_cfg, opts):
            out.append({"name": kind.name(config, cfg), "config": cfg, "parent": False})
    names = [v["name"] for v in out]
    if len(set(names)) != len(names):
        raise ValueError(f"the {subblock} search space names a variant twice: {names}")
    return out


def build_subblock(config, layer: int, subblock: str, cfg):
    """The subblock's module (no norm), None for no_op."""
    cfg = config_from_dict(subblock, cfg)
    return kind_of(subblock, cfg).build(config, layer, cfg)


def init_subblock(config, subblock: str, cfg, parent: dict, calib: dict, linear_init: str = "lstsq") -> dict | None:
    """The weights of a variant (module + the parent's norm, DecoderLayer key names) from the parent layer's subblock
    state dict; None for no_op."""
    cfg = config_from_dict(subblock, cfg)
    new = kind_of(subblock, cfg).init(config, cfg, parent, calib, linear_init)
    if new is None:
        return None
    norm = "input_layernorm.weight" if subblock == "attention" else "post_attention_layernorm.weight"
    return {norm: parent[norm], **new}


def subblock_params(config, subblock: str, cfg) -> int:
    """Parameters of one subblock variant, its RMSNorm included (no_op: 0). Matches num_params of the built module."""
    cfg = config_from_dict(subblock, cfg)
    return kind_of(subblock, cfg).params(config, cfg)


def kv_bytes(config, subblock: str, cfg, tokens, kv_dtype: str = "bf16", batch: int = 1):
    """KV-cache bytes of one subblock variant for `batch` sequences of `tokens` tokens each (prompt + generated): its
    KV heads x head_dim x 2 (K and V) x the dtype's bytes x the positions it caches (a window layer:
    min(tokens, W + S)); 0 for a subblock without a cache."""
    from common.quant import kv_bytes_per_token  # lazy: quant.py may import this module

    cfg = config_from_dict(subblock, cfg)
    kind = kind_of(subblock, cfg)
    heads = kind.kv_heads(config, cfg)
    per_token = kv_bytes_per_token(heads, config.head_dim, kv_dtype) if heads else 0
    return batch * kind.kv_positions(cfg, tokens) * per_token


def kv_cache_bytes_per_layer(config, tokens, kv_dtype: str = "bf16") -> list:
    """Per layer, the KV-cache bytes of one sequence of `tokens` tokens (the window rule applied)."""
    return [kv_bytes(config, "attention", b.attention, tokens, kv_dtype) for b in config.block_configs]


def kv_cache_bytes(config, batch: int, tokens, kv_dtype: str = "bf16"):
    """The whole model's KV cache for `batch` sequences of `tokens` tokens each."""
    return batch * sum(kv_cache_bytes_per_layer(config, tokens, kv_dtype))


def stock_vllm_serves(layer: int, subblock: str, cfg) -> bool:
    """Whether stock vLLM's nemotron_nas (0.32 / 0.33, no plugin) runs this variant in this layer: GQA attention,
    no-op subblocks and FFN widths, yes; linear subblocks and window attention, no; nor a no-op attention in layer 0.
    The repo's plugin (vllm_plugin/) serves them all but windows with sink tokens."""
    cfg = config_from_dict(subblock, cfg)
    return kind_of(subblock, cfg).stock_vllm(layer, cfg)


def plugin_vllm_serves(layer: int, subblock: str, cfg) -> bool:
    """Whether vLLM with the repo's plugin runs this variant (everything but windows with sink tokens)."""
    cfg = config_from_dict(subblock, cfg)
    return kind_of(subblock, cfg).plugin_vllm(layer, cfg)
