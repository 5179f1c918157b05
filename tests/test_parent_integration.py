"""Integration: the embedded SmolLM2-135M-Instruct parent converts with identical logits and generations."""

import pytest
import torch

from common.parent import llama_to_decilm, load_embedded_llama


@pytest.fixture(scope="module")
def parent_pair():
    llama, tokenizer = load_embedded_llama(torch.float32)
    return llama, llama_to_decilm(llama), tokenizer


@pytest.mark.slow
def test_embedded_parent_converts_with_identical_logits_and_greedy_tokens(parent_pair):
    llama, ours, tok = parent_pair
    cfg = ours.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size) == (30, 576, 9, 49152)
    assert cfg.num_kv_heads(0) == 3 and cfg.intermediate_size(0) == 1536 and cfg.tie_word_embeddings
    msgs = [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "What is 12 + 35?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\ndetailed thinking off<|im_end|>")
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        assert (ours(ids).logits - llama(ids).logits).abs().max().item() <= 1e-4
    kw = dict(max_new_tokens=16, do_sample=False)
    assert torch.equal(ours.generate(ids, **kw), llama.generate(ids, **kw))
