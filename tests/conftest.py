"""Shared test helpers: tiny random models (FFN widths are multiples of 256, as the format requires)."""

import copy
import functools
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

from common.model import DeciLMConfig, DeciLMForCausalLM, parent_block  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs whole stage scripts or CLIs (in subprocesses or several in this "
                                       "process) or the real parent: seconds to minutes; the inner loop skips them "
                                       "with -m 'not slow'")


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
# Tolerances: the error a float32 computation can have on any x86 CPU, not what one CPU gave

F32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7


def f32_atol(logits: torch.Tensor, ulps: int = 16) -> float:
    """Absolute error of a quantity made from float32 logits (a log-prob, a mean KL, a cross entropy) when two float32
    paths compute it (other kernels, another summation order: AVX2 vs AVX-512, another batch shape): the logits differ
    by a few ulps of their magnitude, log_softmax adds a few ulps of |logit| + log V, and a KL or a mean is a
    weighted average of such differences (weights summing to 1), so its error is bounded by the same scale. 16 ulps
    leaves room; a real bug (a wrong block, a wrong mask) moves these quantities by orders of magnitude more."""
    return ulps * F32_EPS * (logits.detach().abs().max().item() + math.log(logits.shape[-1]))


def near_ties(logits: torch.Tensor, atol: float) -> float:
    """Fraction of positions whose top two logits are within 2 * atol: an argmax-based rate (accuracy, agreement)
    computed along two float32 paths can differ by this much, since such a position may flip."""
    top = logits.detach().float().topk(2, dim=-1).values
    return ((top[..., 0] - top[..., 1]) <= 2 * atol).float().mean().item()


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


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> str:
    """A small data_gen.build directory (seconds): eval.jsonl has 23 math problems (5, 5, 5, 4, 4 of levels 1-5,
    round robin by level) and 6 instruction prompts, each as an on and an off record; what common.evaluate --data
    reads."""
    from data_gen import build

    out = str(tmp_path_factory.mktemp("data") / "d")
    build.main(["--out", out, "--math", "10", "--science", "0", "--instructions", "10", "--eval-math", "23",
                "--eval-instructions", "6", "--rl-math", "0"])
    return out
