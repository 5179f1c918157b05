"""Shared test helpers: tiny random models (FFN widths are multiples of 256, as the format requires)."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

from common.model import DeciLMConfig, DeciLMForCausalLM, parent_block  # noqa: E402


def tiny_config(num_layers=4, hidden=64, heads=4, kv_heads=2, vocab=512, blocks=None, **kw) -> DeciLMConfig:
    """A tiny parent-shaped config: GQA attention (heads/kv_heads per group) and FFN width 256."""
    blocks = blocks or [parent_block(heads // kv_heads, 6.0) for _ in range(num_layers)]  # 6.0*64*2/3 = 256
    return DeciLMConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                        max_position_embeddings=512, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                        "rope_theta": 10000.0}, tie_word_embeddings=True, block_configs=blocks, bos_token_id=0,
                        eos_token_id=1, pad_token_id=2, **kw)


def tiny_model(seed=0, **kw) -> DeciLMForCausalLM:
    torch.manual_seed(seed)
    return DeciLMForCausalLM(tiny_config(**kw)).eval()


@pytest.fixture
def tiny():
    return tiny_model()
