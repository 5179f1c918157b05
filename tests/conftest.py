"""Shared test helpers: tiny random models (FFN widths are multiples of 256, as the format requires)."""

import copy
import functools
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


# ----------------------------------------------------------------------------
# tiny tokenizer: byte-level BPE with ChatML, vocab 512 (fits tiny_model's vocab), built locally in ~0.1 s

CHATML_TEMPLATE = ("{% for m in messages %}"
                   "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@functools.lru_cache(maxsize=1)
def _build_tiny_tokenizer():
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # ids 0..3 match tiny_config: bos 0, eos 1 (<|im_end|> ends an assistant turn, as in SmolLM2-Instruct), pad 2
    specials = ["<|endoftext|>", "<|im_end|>", "<|pad|>", "<|im_start|>"]
    text = [topics["assignment"][:6000], "system user assistant detailed thinking on off <think>\n</think>\n",
            "What is 12 + 30? So the answer is \\boxed{42}. The answer is 7 × 6 = 42. 0123456789 $ - = ?"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_tokenizer():
    """A fresh copy (tests may set padding_side etc.) of the session's tiny ChatML tokenizer: <= 512 ids, every
    byte encodable, decode(encode(s)) == s."""
    return copy.deepcopy(_build_tiny_tokenizer())


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()
