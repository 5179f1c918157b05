"""The heterogeneous Llama: parity with transformers' Llama, every variant, cache, save/load, bad configs."""

import json
import os

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import common  # noqa: F401
from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.model import (AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig,
                          ffn_mult_to_intermediate_size, intermediate_size_to_ffn_mult, num_params)
from common.parent import llama_to_decilm


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_parent_config_reproduces_llama_logits():
    llama = tiny_llama()
    ours = llama_to_decilm(llama)
    assert ours.config.block_configs[0].attention.n_heads_in_group == 2
    ids = torch.randint(3, 512, (3, 17))
    with torch.no_grad():
        diff = (ours(ids).logits - llama(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_parent_config_greedy_generation_matches_llama_with_left_padding():
    llama = tiny_llama(1)
    ours = llama_to_decilm(llama)
    ids = torch.randint(3, 512, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 2, 0  # left padding on the first row
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert torch.equal(ours.generate(ids, **kw), llama.generate(ids, **kw))


def test_ffn_mult_width_rule_round_trips():
    # DESIGN.md: SmolLM2 (hidden 576) widths 1536/1280/1024/768/512/256 all map back exactly
    for w in (1536, 1280, 1024, 768, 512, 256, 2816):
        m = intermediate_size_to_ffn_mult(w, 576)
        assert ffn_mult_to_intermediate_size(m, 576) == w and round(m, 6) == m
    assert intermediate_size_to_ffn_mult(1536, 576) == 4.0
    with pytest.raises(ValueError, match="multiple of 256"):
        intermediate_size_to_ffn_mult(1000, 576)


VARIANTS = [
    BlockConfig(AttentionConfig(n_heads_in_group=1), FFNConfig(ffn_mult=6.0)),  # MHA, width 256
    BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(ffn_mult=12.0)),  # 1 KV head, width 512
    BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(replace_with_linear=True)),
    BlockConfig(AttentionConfig(no_op=True), FFNConfig(ffn_mult=6.0)),
    BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(no_op=True)),
    BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True)),
]


def test_every_variant_shapes_params_and_names():
    model = tiny_model(blocks=VARIANTS, num_layers=len(VARIANTS))
    ids = torch.randint(3, 512, (2, 7))
    out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (2, 7, 512) and len(out.hidden_states) == len(VARIANTS) + 1
    layers = model.model.layers
    assert layers[1].self_attn.k_proj.weight.shape == (16, 64)  # 1 KV head × head_dim 16
    assert layers[1].mlp.gate_proj.weight.shape == (512, 64)
    assert num_params(layers[2]) == 2 * 64 * 64 + 2 * 64  # two linears + two norms
    assert num_params(layers[5]) == 0
    names = set(model.state_dict())
    assert "model.layers.2.self_attn.linear_attn.weight" in names and "model.layers.2.mlp.linear_mlp.weight" in names
    assert "model.layers.3.input_layernorm.weight" not in names  # no norm where attention is removed
    assert "model.layers.4.post_attention_layernorm.weight" not in names


def test_no_op_layer_leaves_residual_unchanged():
    model = tiny_model(blocks=VARIANTS, num_layers=len(VARIANTS))
    out = model(torch.randint(3, 512, (1, 5)), output_hidden_states=True)
    assert torch.equal(out.hidden_states[5], out.hidden_states[6])


@pytest.mark.parametrize("first_attention_no_op", [False, True])
def test_generate_with_cache_equals_without_cache(first_attention_no_op):
    blocks = VARIANTS[3:] + VARIANTS[:3] if first_attention_no_op else VARIANTS
    model = tiny_model(blocks=blocks, num_layers=len(blocks))
    ids = torch.randint(3, 512, (2, 6))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 2, 0
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=2)
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_save_load_round_trip_through_auto_classes(tmp_path):
    model = tiny_model(blocks=VARIANTS, num_layers=len(VARIANTS))
    out = save_checkpoint(model, None, str(tmp_path / "ckpt"), stage="test", args={"x": 1}, meta={"parent": "p"})
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert "intermediate_size" not in cfg["block_configs"][0]["ffn"]
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(out))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, DeciLMForCausalLM)
    ids = torch.randint(3, 512, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    loaded2, _ = load_checkpoint(out, with_tokenizer=False)
    assert loaded2.config.block_configs == model.config.block_configs
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["stage"] == "test" and meta["parent"] == "p" and "git_commit" in meta


def test_save_refuses_to_overwrite(tmp_path):
    model = tiny_model()
    save_checkpoint(model, None, str(tmp_path / "c"), stage="a")
    before = os.listdir(tmp_path / "c")
    with pytest.raises(CheckpointError, match="already a finished checkpoint"):
        save_checkpoint(model, None, str(tmp_path / "c"), stage="b")
    assert os.listdir(tmp_path / "c") == before


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing"))
    half = tmp_path / "half"
    tiny_model().save_pretrained(half)
    with pytest.raises(CheckpointError, match="no COMPLETED"):
        load_checkpoint(str(half))
    llama_dir = tmp_path / "llama"
    tiny_llama().save_pretrained(llama_dir)
    (llama_dir / "COMPLETED").write_text("x")
    with pytest.raises(CheckpointError, match="not a nemotron-nas checkpoint"):
        load_checkpoint(str(llama_dir))


def test_bad_block_configs_give_clear_errors():
    with pytest.raises(ValueError, match="n_heads_in_group=3 does not divide num_attention_heads=4"):
        tiny_config(blocks=[BlockConfig(AttentionConfig(n_heads_in_group=3), FFNConfig(ffn_mult=6.0))], num_layers=1)
    with pytest.raises(ValueError, match="unknown variant key"):
        DeciLMConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                     block_configs=[{"attention": {"n_heads_in_group": 1, "mamba_state": 16}, "ffn": {"ffn_mult": 6.0}}])
    with pytest.raises(ValueError, match="both no_op and replace_with_linear"):
        tiny_config(blocks=[BlockConfig(AttentionConfig(no_op=True, replace_with_linear=True), FFNConfig(ffn_mult=6.0))],
                    num_layers=1)
    with pytest.raises(ValueError, match="one block config per layer"):
        tiny_config(blocks=VARIANTS[:2], num_layers=3)
    # NVIDIA's inactive keys (Ultra's configs carry them) are accepted
    DeciLMConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, block_configs=[
        {"attention": {"n_heads_in_group": 1, "window_length": None, "sparsify": None}, "ffn": {"ffn_mult": 6.0}}])


def test_parent_ffn_width_not_multiple_of_256_is_refused():
    cfg = tiny_llama().config
    cfg.intermediate_size = 200
    with pytest.raises(ValueError, match="multiple of 256"):
        llama_to_decilm(LlamaForCausalLM(cfg))


def test_packed_4d_mask_matches_separate_sequences():
    model = tiny_model()
    a, b = torch.randint(3, 512, (1, 5)), torch.randint(3, 512, (1, 4))
    packed = torch.cat([a, b], 1)
    seq = torch.tensor([0] * 5 + [1] * 4)
    causal = torch.tril(torch.ones(9, 9, dtype=torch.bool))
    mask = (causal & (seq[:, None] == seq[None, :]))[None, None]
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        out = model(packed, attention_mask=mask, position_ids=pos).logits
        assert torch.allclose(out[:, :5], model(a).logits, atol=1e-5)
        assert torch.allclose(out[:, 5:], model(b).logits, atol=1e-5)


def test_loss_only_on_labeled_positions_matches_full_loss():
    model = tiny_model(blocks=VARIANTS, num_layers=len(VARIANTS))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    full = model(input_ids=ids, labels=labels)
    fast = model(input_ids=ids, labels=labels, return_logits=False)
    assert fast.logits is None and torch.allclose(full.loss, fast.loss, atol=1e-6)
    fast.loss.backward()
    assert all(p.grad is not None for p in model.lm_head.parameters())
