"""nemotron-nas (DeciLM) in vLLM with the subblock variants stock `nemotron_nas` lacks.

Per layer (config.block_configs[i], NVIDIA's format), as this repo's model and NVIDIA's HF code compute them:
  attention  full GQA (num_attention_heads // n_heads_in_group KV heads)   x + o(attn(input_layernorm(x)))
             window_length W: the same over the last W tokens (vLLM's per-layer sliding window; W counts the query)
             replace_with_linear: one bias-free Linear(hidden, hidden)      x + linear_attn(input_layernorm(x))
             no_op: nothing (no norm, no weights)
  ffn        SwiGLU of width from ffn_mult (multiple of 256)                x + down(silu(gate(n)) * up(n)), n = norm(x)
             replace_with_linear: one bias-free Linear(hidden, hidden)      x + linear_mlp(post_attention_layernorm(x))
             no_op: nothing
Weight names are the checkpoint's (`self_attn.linear_attn`, `mlp.linear_mlp`), so vLLM's own weight loader fills
them; only the layer is new (and, in config.py, how vLLM reads the config). Linear subblocks keep no KV cache. The
layer also serves a first layer whose attention is no-op (stock vLLM passes its FFN norm no residual and fails at the
first forward: "too many values to unpack").

A window layer (`window_length` in block_configs[i].attention, NVIDIA's key; the repo's common/variants.py "window")
is vLLM's own attention with `per_layer_sliding_window=W`, passed the way vLLM's Llama passes it (the config's
layer_types / sliding_window, seen by that layer only), so vLLM's kernels and KV-cache manager treat it as a sliding
window layer. Sink tokens (`num_sink_tokens` S > 0: the first S tokens stay visible) have no vLLM kernel (vLLM's
"sinks" are gpt-oss's learned per-head logits, another thing) and are refused (config.UNSERVED_KEYS).
To add a variant, build it in `build_attention` / `build_ffn` and drop its key from config.UNSERVED_KEYS; a module
there takes (positions, hidden_states) for attention and (hidden_states) for an FFN.
"""

from torch import nn
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models import nemotron_nas
from vllm.model_executor.models.llama import LlamaMLP

from decilm_vllm_plugin.config import check_served


class LinearSubblock(nn.Module):
    """A subblock replaced by one bias-free Linear(hidden, hidden), stored as `<name>.weight`."""

    def __init__(self, name: str, hidden_size: int, quant_config, prefix: str):
        super().__init__()
        self.name = name
        setattr(self, name, ReplicatedLinear(hidden_size, hidden_size, bias=False, quant_config=quant_config,
                                             prefix=f"{prefix}.{name}", return_bias=False))

    def forward(self, hidden_states=None, positions=None):
        return getattr(self, self.name)(hidden_states)


class SlidingWindowView:
    """The model config as vLLM's LlamaAttention reads it for one window layer: `layer_types` marks that layer
    "sliding_attention" and `sliding_window` is its W (how vLLM's Llama-family models pass per_layer_sliding_window
    to Attention); every other attribute is the config's own."""

    def __init__(self, config, layer_idx: int, window: int):
        self._config = config
        self.layer_types = ["full_attention"] * config.num_hidden_layers
        self.layer_types[layer_idx] = "sliding_attention"
        self.sliding_window = window

    def __getattr__(self, name):
        return getattr(self._config, name)


def build_attention(config, layer_idx: int, attention, cache_config, quant_config, prefix: str):
    """The attention subblock's module, or None for no_op."""
    if attention.no_op:
        return None
    if attention.replace_with_linear:
        return LinearSubblock("linear_attn", config.hidden_size, quant_config, prefix)
    bias = bool(getattr(config, "attention_bias", False))
    window = getattr(attention, "window_length", None)
    return nemotron_nas.DeciLMAttention(
        config=config if window is None else SlidingWindowView(config, layer_idx, window), hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_attention_heads // attention.n_heads_in_group,
        max_position_embeddings=getattr(config, "max_position_embeddings", 8192), quant_config=quant_config,
        bias=bias, bias_o_proj=bias, cache_config=cache_config, prefix=prefix)


def build_ffn(config, layer_idx: int, ffn, quant_config, prefix: str):
    """The FFN subblock's module, or None for no_op."""
    if ffn.no_op:
        return None
    if ffn.replace_with_linear:
        return LinearSubblock("linear_mlp", config.hidden_size, quant_config, prefix)
    width = nemotron_nas._ffn_mult_to_intermediate_size(ffn.ffn_mult, config.hidden_size)
    return LlamaMLP(hidden_size=config.hidden_size, intermediate_size=width, hidden_act=config.hidden_act,
                    quant_config=quant_config, bias=bool(getattr(config, "mlp_bias", False)), prefix=prefix)


class DeciLMDecoderLayer(nemotron_nas.DeciLMDecoderLayer):
    """One layer: each subblock full, linear or no-op (see the module docstring)."""

    def __init__(self, config, layer_idx: int, cache_config=None, quant_config=None, prefix: str = ""):
        nn.Module.__init__(self)
        block = config.block_configs[layer_idx]
        check_served(block, layer_idx)
        self.hidden_size = config.hidden_size
        attn = build_attention(config, layer_idx, block.attention, cache_config, quant_config, f"{prefix}.self_attn")
        mlp = build_ffn(config, layer_idx, block.ffn, quant_config, f"{prefix}.mlp")
        # DeciModel.forward reads these two flags
        self._is_no_op_attention, self._is_no_op_ffn = attn is None, mlp is None
        if attn is not None:
            self.self_attn = attn
            self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if mlp is not None:
            self.mlp = mlp
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @staticmethod
    def _add_norm(norm, hidden_states, residual):
        """vLLM's fused step: residual += hidden_states, then norm(residual); the first subblock starts the stream."""
        if residual is None:
            return norm(hidden_states), hidden_states
        return norm(hidden_states, residual)

    def forward(self, positions, hidden_states, residual):
        if not self._is_no_op_attention:
            hidden_states, residual = self._add_norm(self.input_layernorm, hidden_states, residual)
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        if not self._is_no_op_ffn:
            hidden_states, residual = self._add_norm(self.post_attention_layernorm, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class DeciLMForCausalLM(nemotron_nas.DeciLMForCausalLM):
    """vLLM's DeciLMForCausalLM built from the layer above; weights load through vLLM's own loader."""

    def _init_model(self, vllm_config, prefix: str = ""):
        return nemotron_nas.DeciModel(vllm_config=vllm_config, prefix=prefix, layer_type=DeciLMDecoderLayer)
