"""common.quant: FP8 E4M3 and NVFP4 rounding (exact grids, error bounds), the straight-through gradient, fake-quantized
Linear layers (QuantLinear) and KV-cache byte accounting."""

import pytest
import torch
from conftest import tiny_config, tiny_model

from common.quant import (FP4_VALUES, FP8_MAX, QuantLinear, calibrate_act_amax, dequantize_fp8, dequantize_model_,
                          e2m1_round, e4m3_round, fake_quant_fp8, fake_quant_nvfp4, fake_quantize_model_,
                          kv_bytes_per_token, quantize_fp8, quantize_model_, quantize_nvfp4,
                          straight_through)
from common.model import AttentionConfig, BlockConfig, FFNConfig
from common.variants import kv_cache_bytes


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
    assert kv_cache_bytes(cfg, 1, 1000, "bf16") == 1000 * 2 * 16 * 2 * (2 + 1)
    assert kv_cache_bytes(cfg, 1, 1000, "fp8") * 2 == kv_cache_bytes(cfg, 1, 1000, "bf16")
    with pytest.raises(ValueError, match="fp4"):
        kv_cache_bytes(cfg, 1, 10, "fp4")


# ----------------------------------------------------------------------------
# The grids


def test_fp8_rounding_equals_torchs_float8_e4m3fn_cast():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(4096) * 10 ** torch.empty(4096).uniform_(-4, 2.5),
                   torch.tensor([0.0, 448.0, -448.0, 2 ** -9, 1.0625, 1.1875])])  # subnormal, ties
    assert torch.equal(e4m3_round(x), x.to(torch.float8_e4m3fn).float())
    q, s = quantize_fp8(x)
    assert torch.equal(q.float(), (x / s).to(torch.float8_e4m3fn).float())
    assert e4m3_round(torch.tensor([1e4, -1e4])).tolist() == [FP8_MAX, -FP8_MAX]  # saturates, never NaN


def test_e2m1_rounds_to_the_nearest_grid_value_with_ties_to_even_mantissa():
    grid = torch.tensor(FP4_VALUES)
    x = torch.linspace(-7, 7, 2801)
    r = e2m1_round(x)
    assert set(r.abs().unique().tolist()) <= set(FP4_VALUES)
    nearest = (x.abs()[:, None] - grid).abs().min(dim=1).values
    assert torch.allclose((r.abs() - x.abs().clamp(max=6)).abs(), nearest.where(x.abs() <= 6, torch.zeros(())), atol=1e-6)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0])
    assert e2m1_round(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -4.0]


def test_an_nvfp4_block_round_trips_exactly_to_the_e2m1_grid_with_e4m3_block_scales():
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.logspace(-3, 1, 8)[:, None]
    values, block_scale, g = quantize_nvfp4(w)
    assert values.shape == w.shape and block_scale.shape == (8, 4) and g.numel() == 1
    assert set(values.abs().unique().tolist()) <= set(FP4_VALUES)
    assert torch.equal(block_scale, e4m3_round(block_scale))  # the block scales are E4M3 values
    assert (block_scale <= FP8_MAX).all() and block_scale.max() == FP8_MAX  # the tensor's amax sets the top scale
    deq = fake_quant_nvfp4(w)
    assert torch.equal(fake_quant_nvfp4(deq), deq)  # a dequantized tensor is a fixed point: exactly on the grid
    # every block's largest magnitude lands on 6 x its scale up to the scale's E4M3 rounding (3 mantissa bits)
    blocks, deq_b = w.reshape(8, 4, 16), deq.reshape(8, 4, 16)
    rel = (deq_b.abs().amax(-1) - blocks.abs().amax(-1)).abs() / blocks.abs().amax(-1)
    assert rel.max() <= 2 ** -4 * 1.01 + 1 / 12  # scale rounding, then one E2M1 step at the top (4 vs 6 -> 1/6 / 2)


def test_quantization_error_bounds():
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    e8 = rel_err(fake_quant_fp8(x, per_channel=True), x)
    e4 = rel_err(fake_quant_nvfp4(x), x)
    # E4M3 rounds with relative error <= 2^-4 (3 mantissa bits); RMS is ~2^-4/sqrt(3) of that bound or less
    assert e8 < 2 ** -4 / 1.5
    # E2M1 has 1 mantissa bit: a Gaussian block quantized to 8 magnitudes keeps ~10 % RMS error (well below 25 %),
    # and blocks of 16 sharing one scale beat one scale per tensor
    assert 0.05 < e4 < 0.15
    v, _, g = quantize_nvfp4(x)
    per_tensor = e2m1_round(x / (x.abs().max() / 6)) * (x.abs().max() / 6)
    assert e4 < rel_err(per_tensor, x)


def test_straight_through_gradient_is_the_identity_inside_the_range_and_zero_where_clipped():
    x = torch.tensor([-3.0, -0.4, 0.3, 1.7, 2.5], requires_grad=True)
    y = straight_through(x, e2m1_round(x.detach()), limit=2.0)
    assert torch.equal(y.detach(), e2m1_round(x.detach()))
    (y * torch.arange(1.0, 6.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]  # d/dx = upstream grad inside |x| <= 2, 0 outside
    x.grad = None
    straight_through(x, e2m1_round(x.detach())).sum().backward()  # no static limit: identity everywhere
    assert x.grad.tolist() == [1.0] * 5


# ----------------------------------------------------------------------------
# QuantLinear in a model


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_quantize_model_keeps_parameters_and_computes_with_the_rounded_weights(fmt):
    model = tiny_model()
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
    assert quantize_model_(model, fmt, quant_acts=False) == 4 * 7
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    with torch.no_grad():
        fq = model(ids).logits
    ref = tiny_model()
    n = 0
    with torch.no_grad():
        for layer in ref.model.layers:  # nvfp4: q/k/v and gate/up share one amax (vLLM serves them fused)
            for group in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                          (layer.self_attn.o_proj,), (layer.mlp.gate_proj, layer.mlp.up_proj), (layer.mlp.down_proj,)):
                amax = max(m.weight.abs().max() for m in group)
                for m in group:
                    m.weight.copy_(fake_quant_fp8(m.weight, True) if fmt == "fp8" else fake_quant_nvfp4(m.weight, amax))
                    n += 1
        assert n == 28 and torch.allclose(fq, ref(ids).logits, atol=1e-5)
    assert not torch.allclose(fq, full, atol=1e-3)
    # gradients reach the master weights straight through; the weights themselves stay full precision
    model.train()
    model(ids, labels=ids).loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert not torch.equal(q.weight, fake_quant_fp8(q.weight, True) if fmt == "fp8" else fake_quant_nvfp4(q.weight))
    assert dequantize_model_(model) == 28 and not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, full)


def test_cached_rounded_weight_follows_an_update_and_activation_calibration_sets_static_scales():
    model = tiny_model()
    quantize_model_(model, "nvfp4")
    ids = torch.randint(0, 512, (2, 16))
    assert calibrate_act_amax(model, [ids]) == 28
    q = model.model.layers[0].self_attn.q_proj
    assert q.act_amax > 0 and q.quant_acts
    with torch.no_grad():
        a = model(ids).logits
        q.weight.mul_(1.5)  # an optimizer step: the cached rounded weight must not go stale
        b = model(ids).logits
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="int4"):
        quantize_model_(tiny_model(), "int4")
