"""FP8 e4m3: error bounds against float32, fake-quant of a model, KV-cache byte accounting."""

import pytest
import torch
from conftest import tiny_config, tiny_model

from common.fp8 import dequantize_fp8, fake_quant_fp8, fake_quantize_model_, kv_bytes_per_token, kv_cache_bytes, quantize_fp8
from common.model import AttentionConfig, BlockConfig, FFNConfig


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_per_tensor_and_per_channel_errors_are_bounded():
    torch.manual_seed(0)
    x = torch.randn(256, 128)
    q, s = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.numel() == 1
    y = dequantize_fp8(q, s)
    assert y.shape == x.shape and y.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits: per-element relative error <= 2^-4 for values in the normal range
    normal = x.abs() > s * 2 ** -6 * 8
    assert ((y - x).abs()[normal] / x.abs()[normal]).max() <= 2 ** -4 + 1e-6
    assert rel_err(y, x) < 0.04


def test_per_channel_beats_per_tensor_on_rows_of_very_different_scale():
    torch.manual_seed(0)
    x = torch.randn(64, 64) * torch.logspace(-6, 0, 64)[:, None]
    e_tensor, e_channel = rel_err(fake_quant_fp8(x), x), rel_err(fake_quant_fp8(x, per_channel=True), x)
    assert e_channel < 0.04 and e_channel <= e_tensor
    small_rows = slice(0, 16)  # per-tensor flushes the tiny rows towards zero; per-channel keeps them
    assert rel_err(fake_quant_fp8(x, True)[small_rows], x[small_rows]) < 0.05 < rel_err(fake_quant_fp8(x)[small_rows], x[small_rows])


def test_fake_quantize_model_changes_linear_weights_by_a_bounded_amount():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n = fake_quantize_model_(model)
    assert n == 4 * 7  # q, k, v, o, gate, up, down per layer; embeddings / tied head untouched
    for name, p in model.named_parameters():
        err = rel_err(p.detach(), before[name])
        assert (err == 0.0) if "embed" in name or "norm" in name else (0 < err < 0.04), name


def test_kv_cache_bytes_counts_only_layers_with_attention():
    blocks = [BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(ffn_mult=6.0)),   # 2 KV heads
              BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(ffn_mult=6.0)),   # 1 KV head
              BlockConfig(AttentionConfig(no_op=True), FFNConfig(ffn_mult=6.0)),
              BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(ffn_mult=6.0))]
    cfg = tiny_config(blocks=blocks)  # head_dim 16
    assert kv_bytes_per_token(2, 16, "bf16") == 2 * 2 * 16 * 2
    assert kv_cache_bytes(cfg, 1000, "bf16") == 1000 * 2 * 16 * 2 * (2 + 1)
    assert kv_cache_bytes(cfg, 1000, "fp8") * 2 == kv_cache_bytes(cfg, 1000, "bf16")
    with pytest.raises(ValueError, match="fp4"):
        kv_cache_bytes(cfg, 10, "fp4")
