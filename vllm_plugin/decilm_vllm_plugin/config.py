"""vLLM's reading of a nemotron-nas config.json: linear attention subblocks, and variants not served refused early.

Stock vLLM takes the model's KV head count from the first block whose attention is not no_op; a linear attention
block there has n_heads_in_group None and the engine fails before building the model. Here the first block with
full attention (the first that keeps a KV cache) decides; each layer's own KV heads still come from its block.
vLLM reads the config in the calling process when LLM(...) is created, so a block config this plugin cannot serve
is refused there, before any engine process starts, with one line naming the layer and the variant.
"""

import vllm.config  # noqa: F401  (first: it imports the convertor module, which imported first is circular)
from vllm.transformers_utils.model_arch_config_convertor import NemotronNasModelArchConfigConvertor


# Block-config keys of NVIDIA's format that change the computation and are not served here (window_length is:
# vLLM's per-layer sliding window; its sink tokens are not).
UNSERVED_KEYS = {"attention": ("num_sink_tokens", "unshifted_sink", "sparsify", "llama4", "mamba"),
                 "ffn": ("moe", "parallel_blocks", "sparsify")}


def check_served(block, layer_idx: int) -> None:
    for part, keys in UNSERVED_KEYS.items():
        sub = getattr(block, part)
        for key in keys:
            value = getattr(sub, key, None)
            if value not in (None, False, 0, [], {}):
                raise ValueError(f"layer {layer_idx}: {part} variant {key}={value!r} is not served by "
                                 f"decilm_vllm_plugin; serve this checkpoint with code that implements it"
                                 + (" (sink tokens: no vLLM kernel keeps them; search without --window-sinks)"
                                    if key == "num_sink_tokens" else ""))


def has_kv_cache(attention) -> bool:
    return not (attention.no_op or getattr(attention, "replace_with_linear", False))


class DeciLMArchConfigConvertor(NemotronNasModelArchConfigConvertor):
    def convert(self, *args, **kwargs):
        for i, block in enumerate(self.hf_text_config.block_configs):
            check_served(block, i)
        return super().convert(*args, **kwargs)

    def get_total_num_kv_heads(self) -> int:
        config = self.hf_text_config
        for block in config.block_configs:
            if has_kv_cache(block.attention):
                return config.num_attention_heads // block.attention.n_heads_in_group
        return config.num_attention_heads  # no layer keeps a KV cache: the count is not used
