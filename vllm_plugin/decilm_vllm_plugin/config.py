"""vLLM's reading of a nemotron-nas config.json, for checkpoints with linear attention subblocks.

Stock vLLM takes the model's KV head count from the first block whose attention is not no_op; a linear attention
block there has n_heads_in_group None and the engine fails before building the model. Here the first block with
full attention (the first that keeps a KV cache) decides; each layer's own KV heads still come from its block.
"""

from vllm.transformers_utils.model_arch_config_convertor import NemotronNasModelArchConfigConvertor


def has_kv_cache(attention) -> bool:
    return not (attention.no_op or getattr(attention, "replace_with_linear", False))


class DeciLMArchConfigConvertor(NemotronNasModelArchConfigConvertor):
    def get_total_num_kv_heads(self) -> int:
        config = self.hf_text_config
        for block in config.block_configs:
            if has_kv_cache(block.attention):
                return config.num_attention_heads // block.attention.n_heads_in_group
        return config.num_attention_heads  # no layer keeps a KV cache: the count is not used
