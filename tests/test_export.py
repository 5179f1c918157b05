"""common/export.py: the compressed-tensors FP8 / NVFP4 export read back equals the fake-quantized weights exactly, the
packed nibble order, dtypes and shapes, the ignore list and quantization_config, the KV scales, and the CLI.
(vLLM's own loader code checks the same layout in tests/test_vllm_export.py.)"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from common.checkpoint import check_checkpoint, save_checkpoint
from common.export import (IGNORE, export_quantized, fused_groups, load_quantized_state, main, pack_e2m1,
                           reciprocal_exact_amax, unpack_e2m1)
from common.quant import (FP4_VALUES, QuantLinear, calibrate_act_amax, dequantize_model_, fake_quant_nvfp4,
                          fake_quant_weight, nvfp4_global_scale, quantizable_linears, quantize_model_)

HAS_KV_FP8 = hasattr(tiny_config(), "kv_cache_dtype")  # common.model's FP8 KV cache (issue #25, in progress)


def quantized(fmt, calibrate=True, seed=0, **kw):
    """A tiny model fake-quantized to `fmt` (as 04_distill.py --quant leaves it); nvfp4 calibrated on random ids."""
    model = tiny_model(seed=seed, **kw)
    quantize_model_(model, fmt)
    if fmt == "nvfp4" and calibrate:
        calibrate_act_amax(model, [torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(seed))])
    return model


def tensors(path):
    return load_file(os.path.join(path, "model.safetensors"))


def config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------
# round trip: the export dequantized is the fake-quantized model


def test_fp8_export_reads_back_as_the_fake_quantized_weights_exactly(tmp_path):
    model = quantized("fp8")
    out = export_quantized(model, tiny_tokenizer(), str(tmp_path / "fp8"), "fp8")
    state, linears = load_quantized_state(out), dict(quantizable_linears(model))
    assert len(linears) == 4 * 7
    for name, m in linears.items():
        assert torch.equal(state[f"{name}.weight"], fake_quant_weight(m.weight, "fp8")), name
        with torch.no_grad():
            assert torch.equal(state[f"{name}.weight"], m.quantized_weight()), name  # what the model computes with
    # the rest is the model's state in bf16; the tied LM head is the embedding (not stored twice)
    for k, v in model.state_dict().items():
        if k.removesuffix(".weight") not in linears and k != "lm_head.weight":
            assert torch.equal(state[k], v.to(torch.bfloat16).float()), k
    assert "lm_head.weight" not in state


def test_nvfp4_export_reads_back_as_fake_quant_nvfp4_with_the_fused_groups_amax(tmp_path):
    """NVFP4: exactly fake_quant_nvfp4(w, amax) with one amax per fused group (q/k/v, gate/up: vLLM applies one global
    scale to qkv_proj and gate_up_proj), raised to a reciprocal-exact value; o_proj / down_proj keep their own."""
    model = quantized("nvfp4")
    out = export_quantized(model, tiny_tokenizer(), str(tmp_path / "nvfp4"), "nvfp4")
    state, raw = load_quantized_state(out), tensors(out)
    linears = dict(quantizable_linears(model))
    groups = fused_groups(linears)
    assert groups["model.layers.0.self_attn.k_proj"] == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert groups["model.layers.0.mlp.up_proj"] == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert groups["model.layers.0.mlp.down_proj"] == ("model.layers.0.mlp.down_proj",)
    own = 0
    for name, m in linears.items():
        amax = reciprocal_exact_amax(max(linears[n].weight.abs().max() for n in groups[name]))
        assert torch.equal(state[f"{name}.weight"], fake_quant_nvfp4(m.weight, amax)), name
        # compressed-tensors' convention: the stored global scale is the divisor 448 * 6 / amax = 1 / ours, and
        # vLLM's 1 / stored gives ours back exactly; one value per fused group
        g = nvfp4_global_scale(amax)
        assert torch.equal(raw[f"{name}.weight_global_scale"], (1.0 / g).reshape(1))
        assert torch.equal(1.0 / raw[f"{name}.weight_global_scale"], g.reshape(1))
        assert all(torch.equal(raw[f"{n}.weight_global_scale"], raw[f"{name}.weight_global_scale"])
                   for n in groups[name])
        act = reciprocal_exact_amax(m.act_amax)  # q, k, v (gate, up) see the same input: one calibrated amax
        assert torch.equal(raw[f"{name}.input_global_scale"], (1.0 / nvfp4_global_scale(act)).reshape(1))
        own += torch.equal(state[f"{name}.weight"], fake_quant_nvfp4(m.weight))
    # the unfused layers equal the model's own fake quantization (the amax moved by a few ulps changes no value)
    assert own >= sum(len(g) == 1 for g in groups.values())


def test_reciprocal_exact_amax_is_the_nearest_amax_whose_scale_survives_vllms_reciprocal():
    for amax in torch.rand(200, generator=torch.Generator().manual_seed(0)) * 20:
        a = reciprocal_exact_amax(amax)
        g = nvfp4_global_scale(a)
        assert a >= amax and (a - amax) <= 64 * torch.finfo(torch.float32).eps * amax
        assert torch.equal(1.0 / (1.0 / g), g)


# ----------------------------------------------------------------------------
# layout


def test_nibble_order_low_nibble_is_the_even_element():
    """compressed-tensors' pack_fp4_to_uint8 / vLLM's break_fp4_bytes: element 2j in bits 0-3, 2j+1 in bits 4-7;
    codes 0-7 are FP4_VALUES, bit 3 the sign."""
    values = torch.tensor([[0.5, -6.0, 1.0, 0.0, -0.5, 3.0, 6.0, -1.5]])
    assert pack_e2m1(values).tolist() == [[0x1 | 0xF << 4, 0x2 | 0x0 << 4, 0x9 | 0x5 << 4, 0x7 | 0xB << 4]]
    every = torch.tensor([list(FP4_VALUES) + [-v for v in FP4_VALUES]])  # codes 0..15 in order
    assert pack_e2m1(every).tolist() == [[c | (c + 1) << 4 for c in range(0, 16, 2)]]
    assert torch.equal(unpack_e2m1(pack_e2m1(every)), every)
    with pytest.raises(ValueError, match="not on the E2M1 grid"):
        pack_e2m1(torch.tensor([[0.7, 1.0]]))


def test_dtypes_and_shapes(tmp_path):
    raw8 = tensors(export_quantized(quantized("fp8"), tiny_tokenizer(), str(tmp_path / "fp8"), "fp8"))
    raw4 = tensors(export_quantized(quantized("nvfp4"), tiny_tokenizer(), str(tmp_path / "nvfp4"), "nvfp4"))
    p = "model.layers.1.mlp.down_proj"  # (64, 256)
    assert (raw8[f"{p}.weight"].dtype, raw8[f"{p}.weight"].shape) == (torch.float8_e4m3fn, (64, 256))
    assert (raw8[f"{p}.weight_scale"].dtype, raw8[f"{p}.weight_scale"].shape) == (torch.float32, (64, 1))
    assert (raw4[f"{p}.weight_packed"].dtype, raw4[f"{p}.weight_packed"].shape) == (torch.uint8, (64, 128))
    assert (raw4[f"{p}.weight_scale"].dtype, raw4[f"{p}.weight_scale"].shape) == (torch.float8_e4m3fn, (64, 16))
    for k in ("weight_global_scale", "input_global_scale"):
        assert (raw4[f"{p}.{k}"].dtype, raw4[f"{p}.{k}"].shape) == (torch.float32, (1,))
    for raw in (raw8, raw4):
        for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
            assert raw[k].dtype == torch.bfloat16, k
        assert not any(k.startswith("lm_head") for k in raw)  # tied: the embedding
        assert {k.rsplit(".", 1)[-1] for k in raw if "_proj." in k} <= {"weight", "weight_scale", "weight_packed",
                                                                         "weight_global_scale", "input_global_scale"}


def test_quantization_config_and_our_config_json(tmp_path):
    out = export_quantized(quantized("nvfp4"), tiny_tokenizer(), str(tmp_path / "nvfp4"), "nvfp4")
    c = config(out)
    q = c["quantization_config"]
    assert (q["quant_method"], q["format"], q["quantization_status"]) == \
        ("compressed-tensors", "nvfp4-pack-quantized", "compressed")
    assert q["ignore"] == IGNORE and {"lm_head", "model.embed_tokens"} <= set(q["ignore"])
    assert q["kv_cache_scheme"] is None
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"]
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"], w["dynamic"]) == \
        (4, "float", "tensor_group", 16, True, False)
    assert (a["num_bits"], a["type"], a["strategy"], a["group_size"], a["dynamic"]) == \
        (4, "float", "tensor_group", 16, "local")
    # our DeciLM config stays as save_checkpoint writes it, model code shipped; unquantized tensors in bf16
    assert (c["model_type"], c["architectures"], c["dtype"]) == ("nemotron-nas", ["DeciLMForCausalLM"], "bfloat16")
    assert len(c["block_configs"]) == 4 and c["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    assert os.path.isfile(os.path.join(out, "modeling_decilm.py")) and not any(
        f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(out))
    check_checkpoint(out)  # COMPLETED, meta.json ("export"), whole files

    fp8 = config(export_quantized(quantized("fp8"), tiny_tokenizer(), str(tmp_path / "fp8"), "fp8"))
    fp8 = fp8["quantization_config"]
    (g8,) = fp8["config_groups"].values()
    assert fp8["format"] == "float-quantized"
    assert (g8["weights"]["num_bits"], g8["weights"]["type"], g8["weights"]["strategy"], g8["weights"]["dynamic"]) == \
        (8, "float", "channel", False)
    assert (g8["input_activations"]["strategy"], g8["input_activations"]["dynamic"]) == ("token", True)


def test_weights_only_and_bad_input(tmp_path):
    tok = tiny_tokenizer()
    plain = tiny_model()  # never calibrated: NVFP4 activations have no static scale
    with pytest.raises(ValueError, match="no calibrated input amax"):
        export_quantized(plain, tok, str(tmp_path / "a"), "nvfp4")
    assert not os.path.exists(tmp_path / "a")
    out = export_quantized(plain, tok, str(tmp_path / "w4a16"), "nvfp4", weights_only=True)
    (group,) = config(out)["quantization_config"]["config_groups"].values()
    assert group["input_activations"] is None and not any(k.endswith("input_global_scale") for k in tensors(out))
    with pytest.raises(ValueError, match="computes with fp8 fake quantization; export it with --format fp8"):
        export_quantized(quantized("fp8"), tok, str(tmp_path / "b"), "nvfp4")
    with pytest.raises(ValueError, match="unknown export format 'int4'"):
        export_quantized(plain, tok, str(tmp_path / "c"), "int4")
    with pytest.raises(ValueError, match="divisible by 16"):
        export_quantized(tiny_model(hidden=72, heads=4), tok, str(tmp_path / "d"), "nvfp4", weights_only=True)


@pytest.mark.skipif(not HAS_KV_FP8, reason="common.model has no kv_cache_dtype yet")
def test_fp8_kv_cache_scales_are_carried(tmp_path):
    from common.quant import set_kv_cache_fp8_
    model = quantized("fp8")
    set_kv_cache_fp8_(model, [0.01, 0.02, 0.03, 0.04], [0.05, 0.06, 0.07, 0.08])
    out = export_quantized(model, tiny_tokenizer(), str(tmp_path / "kv"), "fp8")
    kv = config(out)["quantization_config"]["kv_cache_scheme"]
    assert (kv["num_bits"], kv["type"], kv["strategy"], kv["dynamic"], kv["symmetric"]) == (8, "float", "tensor",
                                                                                            False, True)
    raw, state = tensors(out), load_quantized_state(out)
    for k, v in model.state_dict().items():
        if k.endswith(("k_scale", "v_scale")):
            assert raw[k].dtype == torch.float32 and torch.equal(raw[k], v) and torch.equal(state[k], v), k
    assert sum(k.endswith(("k_scale", "v_scale")) for k in raw) == 8


# ----------------------------------------------------------------------------
# CLI


def nvfp4_checkpoint(path):
    """A checkpoint as 04_distill.py --quant nvfp4 saves it: plain Linears, meta.json "quant" with the act amax."""
    model = quantized("nvfp4")
    quant = {"format": "nvfp4", "quant_acts": True, "method": "ptq",
             "act_amax": {n: m.act_amax for n, m in model.named_modules() if isinstance(m, QuantLinear)}}
    dequantize_model_(model)
    return save_checkpoint(model, tiny_tokenizer(), str(path), stage="qad", meta={"quant": quant}), quant


@pytest.mark.slow
def test_cli_exports_a_quantized_checkpoint_and_refuses_an_existing_out(tmp_path, capsys):
    ckpt, quant = nvfp4_checkpoint(tmp_path / "qad")
    main(["--model", ckpt, "--out", str(tmp_path / "served"), "--format", "nvfp4"])
    assert "28 Linear layers in compressed-tensors nvfp4-pack-quantized" in capsys.readouterr().out
    raw = tensors(str(tmp_path / "served"))
    name = "model.layers.2.mlp.down_proj"  # the calibrated amax from meta.json became the static input scale
    assert torch.equal(raw[f"{name}.input_global_scale"],
                       (1.0 / nvfp4_global_scale(reciprocal_exact_amax(quant["act_amax"][name]))).reshape(1))
    with pytest.raises(SystemExit, match="quantized for nvfp4 .* export it with --format nvfp4"):
        main(["--model", ckpt, "--out", str(tmp_path / "other"), "--format", "fp8"])
    # an existing --out: a one-line error and a non-zero exit, nothing written
    before = sorted(os.listdir(tmp_path / "served"))
    r = subprocess.run([sys.executable, "-m", "common.export", "--model", ckpt, "--out", str(tmp_path / "served"),
                        "--format", "nvfp4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: --out {tmp_path / 'served'} is already a finished checkpoint; choose another --out or delete it"]
    assert sorted(os.listdir(tmp_path / "served")) == before
