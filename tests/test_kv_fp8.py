"""Calibrated FP8 KV cache (issue #25): per-layer K / V scales = amax / 448 on calibration text, saved with the
checkpoint; the model fake-quantizes post-RoPE K and V with them before they enter the cache and the attention."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, f32_atol, tiny_config, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from common.checkpoint import load_checkpoint, save_checkpoint
from common.data import text_chunks
from common.evaluate import TextEval
from common.model import AttentionConfig, BlockConfig, FFNConfig, fake_quant_kv, rotate_half
from common.quant import (FP8_MAX, calibrate_kv_scales, kv_calibrate_main, kv_calibration_chunks,
                          set_kv_cache_fp8_)
from common.text_corpus import distill_documents

MIXED = [BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(ffn_mult=6.0)),
         BlockConfig(AttentionConfig(no_op=True), FFNConfig(ffn_mult=6.0)),
         BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(ffn_mult=6.0)),
         BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(ffn_mult=6.0))]


def batches(seed=0, n=2, T=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (2, T), generator=g) for _ in range(n)]


@torch.no_grad()
def reference_kv(model, ids):
    """{layer: (post-RoPE K, V)} computed layer by layer, without hooks or Attention.qkv."""
    m = model.model
    x = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    cos, sin = m.rotary_emb(x, pos)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    out = {}
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        if hasattr(a, "k_proj"):
            h = layer.input_layernorm(x)
            B, T, _ = h.shape
            k = a.k_proj(h).view(B, T, -1, a.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(B, T, -1, a.head_dim).transpose(1, 2)
            out[i] = (k * cos + rotate_half(k) * sin, v)
        x = layer(x, (cos.squeeze(1), sin.squeeze(1)))
    return out


def kl(p_logits, q_logits):
    return F.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True, reduction="batchmean").item()


# ----------------------------------------------------------------------------
# the config field


def test_auto_is_the_default_and_adds_nothing():
    model = tiny_model()
    assert model.config.kv_cache_dtype == "auto"
    assert not any("scale" in k for k in model.state_dict())
    assert not any(getattr(m, "kv_fp8", False) for m in model.modules())
    # config.json and the generation cache's fingerprint of an "auto" model are as before the field existed
    assert "kv_cache_dtype" not in model.config.to_diff_dict() and "kv_cache_dtype" not in model.config.to_dict()
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int8' is not supported; use one of \('auto', 'fp8'\)"):
        tiny_config(kv_cache_dtype="int8")


def test_auto_model_is_unchanged_by_the_fp8_code_path():
    """An "auto" model computes what it did before the field existed: the same logits as a model whose attention
    layers were switched to FP8 and back off (kv_fp8 False), and different ones from the FP8 model."""
    model, ids = tiny_model(), batches()[0]
    with torch.no_grad():
        before = model(ids).logits
        set_kv_cache_fp8_(model)
        fp8 = model(ids).logits
        for m in model.modules():
            if hasattr(m, "kv_fp8"):
                m.kv_fp8 = False
        assert torch.equal(model(ids).logits, before)
    assert not torch.equal(fp8, before)


# ----------------------------------------------------------------------------
# calibration


def test_calibration_returns_amax_over_448_per_layer_and_none_without_attention():
    model = tiny_model(blocks=MIXED)
    data = batches(n=3)

    def check(k_scales, v_scales):
        refs = [reference_kv(model, ids) for ids in data]
        assert k_scales[1] is None and k_scales[2] is None and v_scales[1] is None and v_scales[2] is None
        for i in (0, 3):
            k_amax = max(r[i][0].abs().max().item() for r in refs)
            v_amax = max(r[i][1].abs().max().item() for r in refs)
            assert k_scales[i] == pytest.approx(k_amax / 448, rel=1e-6)
            assert v_scales[i] == pytest.approx(v_amax / 448, rel=1e-6)

    k_scales, v_scales = calibrate_kv_scales(model, data)
    check(k_scales, v_scales)
    # post-RoPE, not pre-RoPE: the rotation moves the amax
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(data[0]))
    assert model.model.layers[0].self_attn.k_proj(h).abs().max().item() / 448 != pytest.approx(k_scales[0], rel=1e-6)
    # an FP8 model calibrates on its full-precision K / V (the inputs of later layers carry the earlier layers' FP8)
    set_kv_cache_fp8_(model, k_scales, v_scales)
    again = calibrate_kv_scales(model, data)
    check(*again)
    assert again[0][0] == k_scales[0] and again[1][0] == v_scales[0] and again[0][3] != k_scales[3]
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_set_kv_cache_fp8_refuses_scales_that_do_not_fit():
    model = tiny_model(blocks=MIXED)
    with pytest.raises(ValueError, match="has 3 entries but the model has 4 layers"):
        set_kv_cache_fp8_(model, [1.0] * 3)
    with pytest.raises(ValueError, match=r"attention layers \[3\] have no positive finite scale"):
        set_kv_cache_fp8_(model, [1.0, None, None, 0.0])
    assert model.config.kv_cache_dtype == "auto"  # nothing changed
    assert set_kv_cache_fp8_(model, [0.5, None, None, 0.25], None) == 2
    a = model.model.layers[3].self_attn
    assert model.config.kv_cache_dtype == "fp8" and a.k_scale.item() == 0.25 and a.v_scale.item() == 1.0
    assert a.k_scale.dtype == torch.float32


def test_calibrated_fake_quant_error_is_bounded_by_e4m3_precision():
    """With scale = amax / 448 nothing on the calibration data clips, and each value moves by at most half an E4M3
    step: 2^-4 relative in the normal range (3 mantissa bits), 2^-10 x scale among subnormals (step 2^-9)."""
    model = tiny_model()
    data = batches()
    k_scales, v_scales = calibrate_kv_scales(model, data)
    for i, (k, v) in reference_kv(model, data[0]).items():
        for x, s in ((k, k_scales[i]), (v, v_scales[i])):
            assert (x.abs() / s).max() <= FP8_MAX * (1 + 1e-6)
            err = (fake_quant_kv(x, torch.tensor(s)) - x).abs()
            assert (err <= torch.maximum(x.abs() * 2 ** -4, torch.full_like(x, s * 2 ** -10)) * (1 + 1e-5)).all()
            assert (err / x.abs().max()).max() < 2 ** -4


def test_unscaled_fp8_is_worse_than_calibrated_on_small_kv():
    """K and V of magnitude ~1e-3 fall below E4M3's normal range (2^-6) with scale 1: most round to a few subnormal
    codes or zero. Calibrated scales put them on the full grid."""
    model = tiny_model()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_proj.weight.mul_(0.01)
            layer.self_attn.v_proj.weight.mul_(0.01)
            layer.self_attn.o_proj.weight.mul_(100.0)  # keep the attention output's size: the model still uses it
    data, ids = batches(), batches(seed=1)[0]
    with torch.no_grad():
        ref = model(ids).logits
    k_scales, v_scales = calibrate_kv_scales(model, data)
    assert max(s for s in k_scales + v_scales) * FP8_MAX < 2 ** -5  # small: under 2^-6 x 2 at the amax
    errs, kls = {}, {}
    for name, scales in (("unscaled", (None, None)), ("calibrated", (k_scales, v_scales))):
        set_kv_cache_fp8_(model, *scales)
        kv = reference_kv(model, ids)
        errs[name] = max((fake_quant_kv(x, a.k_scale if j == 0 else a.v_scale) - x).norm().item() / x.norm().item()
                         for i, pair in kv.items() for j, x in enumerate(pair)
                         for a in [model.model.layers[i].self_attn])
        with torch.no_grad():
            kls[name] = kl(ref, model(ids).logits)
    assert errs["calibrated"] < 0.05 < errs["unscaled"]
    assert kls["calibrated"] * 10 < kls["unscaled"]


# ----------------------------------------------------------------------------
# the cache holds quantized values


@torch.no_grad()
def test_fp8_prefill_equals_step_by_step_cached_decoding():
    model = tiny_model()
    data = batches()
    set_kv_cache_fp8_(model, *calibrate_kv_scales(model, data))
    ids = batches(seed=2, n=1, T=12)[0]
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :1], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(1, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= f32_atol(full)
    for i, layer in enumerate(model.model.layers):  # every cached K / V is on the scaled E4M3 grid
        a, keys, values = layer.self_attn, cache.layers[i].keys, cache.layers[i].values
        assert torch.equal(fake_quant_kv(keys, a.k_scale), keys) and torch.equal(fake_quant_kv(values, a.v_scale), values)
    auto = tiny_model()
    auto_cache = auto(ids, use_cache=True).past_key_values
    a = model.model.layers[0].self_attn
    assert not torch.equal(fake_quant_kv(auto_cache.layers[0].keys, a.k_scale), auto_cache.layers[0].keys)


# ----------------------------------------------------------------------------
# checkpoints and the CLI


def test_save_load_round_trip_keeps_the_scales_and_the_logits(tmp_path):
    model = tiny_model(blocks=MIXED)
    k_scales, v_scales = calibrate_kv_scales(model, batches())
    set_kv_cache_fp8_(model, k_scales, v_scales)
    out = save_checkpoint(model, tiny_tokenizer(), str(tmp_path / "c"), stage="test")
    assert json.load(open(os.path.join(out, "config.json")))["kv_cache_dtype"] == "fp8"
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(k for k in tensors if "scale" in k) == [f"model.layers.{i}.self_attn.{n}_scale"
                                                          for i in (0, 3) for n in "kv"]
    for i in (0, 3):  # float32 scalars, exactly the calibrated values
        assert tensors[f"model.layers.{i}.self_attn.k_scale"].dtype == torch.float32
        assert tensors[f"model.layers.{i}.self_attn.k_scale"].item() == torch.tensor(k_scales[i]).item()
        assert tensors[f"model.layers.{i}.self_attn.v_scale"].item() == torch.tensor(v_scales[i]).item()
    ids = batches(seed=3)[0]
    loaded, _ = load_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    bf16, _ = load_checkpoint(out, dtype=torch.bfloat16, with_tokenizer=False)  # the scales stay float32
    assert bf16.model.layers[3].self_attn.k_scale.dtype == torch.float32
    assert bf16.model.layers[3].self_attn.k_scale.item() == loaded.model.layers[3].self_attn.k_scale.item()


def test_fp8_config_without_scales_in_the_checkpoint_loads_unscaled(tmp_path):
    from safetensors.torch import save_file
    model = tiny_model()
    set_kv_cache_fp8_(model, [0.01] * 4, [0.02] * 4)
    out = save_checkpoint(model, None, str(tmp_path / "c"), stage="test")
    path = os.path.join(out, "model.safetensors")
    save_file({k: v for k, v in load_file(path).items() if "scale" not in k}, path, metadata={"format": "pt"})
    loaded, _ = load_checkpoint(out, with_tokenizer=False)
    assert all(m.k_scale.item() == 1.0 and m.v_scale.item() == 1.0 for m in loaded.modules() if hasattr(m, "k_scale"))


def _ckpt(tmp_path, name="in"):
    return save_checkpoint(tiny_model(blocks=MIXED), tiny_tokenizer(), str(tmp_path / name), stage="test")


@pytest.mark.slow
def test_kv_calibrate_cli_writes_a_loadable_checkpoint_and_refuses_an_existing_out(tmp_path, capsys):
    src = _ckpt(tmp_path)
    out = str(tmp_path / "kv")
    kv_calibrate_main(["--model", src, "--out", out, "--calib-tokens", "256", "--seq-len", "64"])
    model, tok = load_checkpoint(out)
    assert model.config.kv_cache_dtype == "fp8"
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["stage"] == "kv_fp8" and meta["parent"] == src and meta["kv_cache"]["calibration"]["tokens"] == 256
    parent, _ = load_checkpoint(src)
    chunks = kv_calibration_chunks(tok, 256, 64)
    k_scales, v_scales = calibrate_kv_scales(parent, chunks.split(8))
    for i in (0, 3):
        assert model.model.layers[i].self_attn.k_scale.item() == torch.tensor(k_scales[i]).item()
        assert model.model.layers[i].self_attn.v_scale.item() == torch.tensor(v_scales[i]).item()
    assert "self_attn" not in dict(model.model.layers[1].named_children())  # no-op attention: no scales
    # an existing --out: one-line error, non-zero exit, nothing touched
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    with pytest.raises(SystemExit) as e:
        kv_calibrate_main(["--model", src, "--out", out])
    assert str(e.value.code).startswith(f"error: --out {out} is already a finished checkpoint")
    assert "\n" not in str(e.value.code)
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before
    # --unscaled: scale 1 everywhere, no calibration text
    kv_calibrate_main(["--model", src, "--out", str(tmp_path / "kv1"), "--unscaled"])
    unscaled, _ = load_checkpoint(str(tmp_path / "kv1"), with_tokenizer=False)
    assert [m.k_scale.item() for m in unscaled.modules() if hasattr(m, "k_scale")] == [1.0, 1.0]


@pytest.mark.slow
def test_kv_calibrate_cli_bad_input_exits_with_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "common.quant", "kv-calibrate", "--model", str(tmp_path / "nope"),
           "--out", str(tmp_path / "o")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'nope'} does not exist; run the stage that writes it first (see README)"]
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_shipped_model_code_runs_the_fp8_cache_without_this_repo(tmp_path):
    """modeling_decilm.py (common/model.py, copied into the checkpoint) stays self-contained: plain transformers with
    trust_remote_code, in a process that cannot import the repo, gives our FP8-KV logits."""
    model = tiny_model()
    set_kv_cache_fp8_(model, *calibrate_kv_scales(model, batches()))
    out = save_checkpoint(model, None, str(tmp_path / "c"), stage="test")
    ids = batches(seed=4)[0]
    script = ("import sys, json, torch\nfrom transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()\n"
              "assert m.config.kv_cache_dtype == 'fp8' and type(m).__module__.startswith('transformers_modules')\n"
              "with torch.no_grad():\n    print(json.dumps(m(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-I", "-c", script, out, json.dumps(ids.tolist())], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        want = model(ids).logits
    assert (got - want).abs().max() <= f32_atol(want)


# ----------------------------------------------------------------------------
# calibration text vs evaluation text


def test_calibration_text_is_disjoint_from_the_evaluation_text():
    """The CLI's calibration chunks (the distillation mix) share no 24-token window with the evaluation suite's
    held-out text (TextEval's chunks are drawn from it)."""
    tok = tiny_tokenizer()

    def windows(ids, n=24):
        return {hash(tuple(r[i:i + n])) for r in ids.tolist() for i in range(0, len(r) - n + 1)}

    calib = kv_calibration_chunks(tok, 16384, 512)  # the CLI's defaults
    held = text_chunks(tok, distill_documents("heldout"), 64)
    tev = TextEval(tiny_model(), tok, seq_len=64, num_seqs=16)
    assert windows(tev.ids) <= windows(held)  # the suite's text is this held-out text
    assert calib.shape == (32, 512) and not windows(calib) & windows(held)
