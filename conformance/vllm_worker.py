"""Runs inside the vLLM virtualenv (conformance/setup_vllm.sh), never imports fqcheck: loads each
checkpoint directory with vLLM in this process, so the loader's own exception is what is recorded,
and greedy-decodes a few tokens from fixed prompt ids (no tokenizer needed).

    python vllm_worker.py IN.json OUT.json     IN: ["dir", ...]; OUT: {"dir": {...}, ...}
"""
import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the loader's own exception
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")          # GiB; the default takes most of the RAM

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
MAX_TOKENS = 12


def load_and_generate(path: str) -> dict:
    from vllm import LLM, SamplingParams
    t = time.time()
    llm = None
    try:
        llm = LLM(model=path, skip_tokenizer_init=True, enforce_eager=True, max_model_len=64, dtype="auto", seed=0)
        out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                           use_tqdm=False)
        return {"loaded": True, "tokens": list(out[0].outputs[0].token_ids), "seconds": round(time.time() - t, 1),
                "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch.")}
    except BaseException as e:  # noqa: BLE001 - MemoryError included: it is the result being recorded
        return {"loaded": False, "exc_type": type(e).__name__, "exc": str(e)[:500],
                "where": traceback.extract_tb(e.__traceback__)[-1].filename.split("site-packages/")[-1],
                "seconds": round(time.time() - t, 1)}
    finally:
        del llm
        _reset()


def _reset() -> None:
    """Let the next LLM in this process start clean, also after a failed load."""
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()


def main() -> None:
    dirs = json.load(open(sys.argv[1]))
    import vllm
    results = {"vllm": vllm.__version__}
    for d in dirs:
        results[d] = load_and_generate(d)
        print(f"[vllm-worker] {os.path.basename(d)}: {results[d]}", file=sys.stderr, flush=True)
    json.dump(results, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
