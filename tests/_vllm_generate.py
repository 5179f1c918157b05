"""Greedy generation in vLLM for tests/test_vllm.py, in a process that cannot import this repo.

    python -I tests/_vllm_generate.py SPEC.json OUT.json

SPEC: {"models": [{"name": ..., "path": ...}], "prompts": [text, ...], "max_tokens": N, "logprobs": K,
       "refused": [{"name": ..., "path": ...}]}. Every model loads the way a user's process loads a checkpoint
(LLM(model=DIR, trust_remote_code=True), the config code shipped in DIR), float32, eager. OUT: per model the prompt
token ids, the generated token ids and the top-K logprobs at each generated position; per "refused" model the error
its engine raised (or null when it loaded). Which vLLM plugins load is the caller's VLLM_PLUGINS.
Run with -I (no script directory on sys.path): the file checks that the repo's `common` is not importable.
"""

import gc
import importlib.util
import json
import os
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    assert importlib.util.find_spec("common") is None, "this repo is importable here; run with python -I"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; unset, vLLM reserves most of the RAM
    from vllm import LLM, SamplingParams

    with open(spec_path) as f:
        spec = json.load(f)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=spec.get("logprobs", 0))
    engine = dict(trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    out = {"models": {}, "refused": {}}
    for m in spec["models"]:
        t0 = time.time()
        llm = LLM(model=m["path"], **engine)
        start = time.time() - t0
        t0 = time.time()
        res = llm.generate(spec["prompts"], params, use_tqdm=False)
        out["models"][m["name"]] = {
            "engine_start_s": round(start, 1), "generate_s": round(time.time() - t0, 1),
            "prompt_ids": [r.prompt_token_ids for r in res],
            "ids": [list(r.outputs[0].token_ids) for r in res],
            "logprobs": [[{str(t): lp.logprob for t, lp in pos.items()} for pos in (r.outputs[0].logprobs or [])]
                         for r in res]}
        del llm, res
        gc.collect()
    for m in spec.get("refused", []):
        try:
            llm = LLM(model=m["path"], **engine)
            out["refused"][m["name"]] = None
            del llm
        except Exception as e:  # noqa: BLE001  (the test reads the message)
            out["refused"][m["name"]] = f"{type(e).__name__}: {e}"
        gc.collect()
    out["common_imported"] = "common" in sys.modules
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":  # vLLM's engine process is spawned: it re-imports this file
    main(*sys.argv[1:3])
