"""vLLM plugin for nemotron-nas (DeciLM) checkpoints: serves every subblock variant this repo's search produces.

vLLM calls `register` in each of its processes (entry point group `vllm.general_plugins`, see pyproject.toml).
It replaces vLLM's class for the architecture "DeciLMForCausalLM" with `decilm_vllm_plugin.model.DeciLMForCausalLM`,
which serves what stock `nemotron_nas` serves plus linear attention and linear FFN subblocks and window attention
(vLLM's per-layer sliding window; stock vLLM ignores window_length and attends to everything) (registered by name, so
the model code is imported only where vLLM builds a model), and vLLM's reader of the model_type "nemotron-nas"
config with `decilm_vllm_plugin.config.DeciLMArchConfigConvertor` (its KV head count skips linear attention).
Set VLLM_PLUGINS to a list without `decilm_linear` to run stock vLLM instead.
"""

ARCHITECTURE = "DeciLMForCausalLM"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.transformers_utils.model_arch_config_convertor import MODEL_ARCH_CONFIG_CONVERTORS

    from decilm_vllm_plugin.config import DeciLMArchConfigConvertor

    MODEL_ARCH_CONFIG_CONVERTORS["nemotron-nas"] = DeciLMArchConfigConvertor
    ModelRegistry.register_model(ARCHITECTURE, "decilm_vllm_plugin.model:DeciLMForCausalLM")
