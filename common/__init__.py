"""What two or more stages share. Importing it registers our model type with transformers' Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from common.model import DeciLMConfig, DeciLMForCausalLM

AutoConfig.register("nemotron-nas", DeciLMConfig, exist_ok=True)
AutoModelForCausalLM.register(DeciLMConfig, DeciLMForCausalLM, exist_ok=True)
