"""Runs one peer system on a prepared workload; started by `offline.py` inside the peer's own venv.

Usage: python peer_worker.py SPEC.json   (SPEC written by offline.py)

Stdlib only at import time: each peer venv has its own library and nothing of llmscale.
Protocol: JSON lines on the stdout the worker was started with ({"event": "loaded" | "progress" |
"phase" | "result" | "error", ...}); the result is the last line. Library chatter is moved to stderr
first, since vLLM and llama.cpp log to stdout.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

# Run one request and return the number of tokens it generated.
RunOne = Callable[[list[int], int], int]


def open_protocol() -> TextIO:
    fd = os.dup(1)
    os.dup2(2, 1)  # everything written to fd 1 from now on (C libraries too) lands in the log
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1)


def die_with_parent() -> None:
    """A worker outliving a killed benchmark would skew whatever runs next on the machine."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: Ctrl-C still reaches the whole process group


PROTO: TextIO = open_protocol()
die_with_parent()


def emit(event: str, **fields: Any) -> None:
    PROTO.write(json.dumps({"event": event, **fields}) + "\n")


def timed(run: RunOne, prompt: list[int], n: int) -> float:
    t = time.perf_counter()
    got = run(prompt, n)
    if got != n:
        raise RuntimeError(f"asked for {n} tokens, got {got}")
    return time.perf_counter() - t


def probe(run: RunOne, spec: dict[str, Any]) -> dict[str, float]:
    """Single-stream latency. Each timing uses its own prompt, so no prefix cache can serve it."""
    p = spec["probe"]
    n = p["max_tokens"]
    ttft = [timed(run, ids, 1) for ids in p["ttft_prompts"]]
    e2e = [timed(run, ids, n) for ids in p["e2e_prompts"]]
    ttft_s, e2e_s = statistics.median(ttft), statistics.median(e2e)
    return {"ttft_s": ttft_s, "tpot_s": (e2e_s - ttft_s) / (n - 1), "e2e_s": e2e_s}


def run_sequential(run: RunOne, spec: dict[str, Any]) -> dict[str, Any]:
    """The workload one request at a time, in order (the first `limit` requests only, if set)."""
    reqs = spec["requests"][: spec.get("limit") or None]
    emit("progress", done=0, total=len(reqs))
    t = time.perf_counter()
    out = 0
    for i, r in enumerate(reqs):
        out += run(r["prompt_token_ids"], r["max_tokens"])
        emit("progress", done=i + 1, total=len(reqs))
    return {"wall_s": time.perf_counter() - t, "num_requests": len(reqs), "output_tokens": out,
            "generated_tokens": out}


# ---------------------------------------------------------------- Hugging Face transformers
def hf(spec: dict[str, Any], batched: bool) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["dtype"]))
    model.to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    emit("loaded", load_s=time.perf_counter() - t)

    @torch.inference_mode()
    def generate(prompts: Sequence[list[int]], n: int) -> int:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding: every row's last prompt token lines up
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        # min_new_tokens == max_new_tokens keeps EOS from ending a row early: EOS ignored, as elsewhere.
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=pad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # timed to the last token, as llmscale's are
        return (out.shape[1] - width) * len(prompts)

    def one(p: list[int], n: int) -> int:
        return generate([p], n)

    timed(one, spec["probe"]["warmup_prompt"], 8)
    if not batched:
        res = run_sequential(one, spec)
    else:
        reqs = spec["requests"]
        bs = spec["batch_size"]
        emit("progress", done=0, total=len(reqs))
        t = time.perf_counter()
        useful = generated = 0
        for start in range(0, len(reqs), bs):
            chunk = reqs[start:start + bs]
            # A static batch runs until its longest request is done; shorter ones idle along.
            n = max(r["max_tokens"] for r in chunk)
            generated += generate([r["prompt_token_ids"] for r in chunk], n)
            useful += sum(r["max_tokens"] for r in chunk)
            emit("progress", done=start + len(chunk), total=len(reqs))
        res = {"wall_s": time.perf_counter() - t, "num_requests": len(reqs), "output_tokens": useful,
               "generated_tokens": generated}
    emit("phase", name="probe")
    return {**res, **probe(one, spec), "version": f"transformers {transformers.__version__}, "
            f"torch {torch.__version__}"}


# ---------------------------------------------------------------- vLLM (CPU build)
def vllm(spec: dict[str, Any]) -> dict[str, Any]:
    threads = spec["threads"]
    # Unset, vLLM binds its OpenMP pool to fewer cores than the machine has; it also needs a KV size.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["vllm_kv_cache_gib"]))
    import vllm as vllm_pkg
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    class Bar(tqdm):  # type: ignore[misc]  # vLLM's own bar, forwarded to the parent as events
        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if str(self.desc).startswith("Processed"):
                emit("progress", done=int(self.n), total=int(self.total or 0))
            return shown

    t = time.perf_counter()
    llm = LLM(model=spec["model_dir"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
              enable_prefix_caching=False)  # as llmscale runs: repeated prompts must not measure the cache
    emit("loaded", load_s=time.perf_counter() - t)

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)

    def one(p: list[int], n: int) -> int:
        out = llm.generate([{"prompt_token_ids": p}], params(n), use_tqdm=False)
        return len(out[0].outputs[0].token_ids)

    timed(one, spec["probe"]["warmup_prompt"], 8)
    reqs = spec["requests"]
    emit("progress", done=0, total=len(reqs))
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs],
                        [params(r["max_tokens"]) for r in reqs], use_tqdm=Bar)
    wall = time.perf_counter() - t
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    sched = llm.llm_engine.vllm_config.scheduler_config
    emit("phase", name="probe")
    return {"wall_s": wall, "num_requests": len(reqs), "output_tokens": out_tokens,
            "generated_tokens": out_tokens, **probe(one, spec), "version": f"vllm {vllm_pkg.__version__}",
            "settings": {"max_num_seqs": sched.max_num_seqs,
                         "max_num_batched_tokens": sched.max_num_batched_tokens,
                         "VLLM_CPU_OMP_THREADS_BIND": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                         "VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}}


# ---------------------------------------------------------------- llama.cpp (llama-cpp-python)
def llamacpp(spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    from llama_cpp import Llama

    # Weight repacking into "extra buffer types" (AMX and friends) dies with SIGILL on some CPUs.
    # Llama() in 0.3.36 has no argument for it (unknown kwargs are silently dropped), so switch it
    # off in the defaults that Llama() starts from.
    low = llama_cpp.llama_cpp
    fields = {name for name, *_ in low.llama_model_params._fields_}
    if "use_extra_bufts" in fields:
        make_defaults = low.llama_model_default_params

        def no_extra_bufts() -> Any:
            p = make_defaults()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = no_extra_bufts

    t = time.perf_counter()
    llm = Llama(model_path=spec["gguf"], n_ctx=spec["max_model_len"], n_threads=spec["threads"],
                n_threads_batch=spec["threads"], n_batch=512, seed=0, verbose=False)
    emit("loaded", load_s=time.perf_counter() - t)
    extra_bufts = bool(getattr(llm.model_params, "use_extra_bufts", True))

    def one(p: list[int], n: int) -> int:
        llm.reset()  # forget the previous request: no prefix reuse across requests
        got = 0
        # generate() never stops by itself (EOS is checked one level up), so EOS is ignored here.
        for _ in llm.generate(p, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            got += 1
            if got == n:
                break
        return got

    timed(one, spec["probe"]["warmup_prompt"], 8)
    res = run_sequential(one, spec)
    emit("phase", name="probe")
    return {**res, **probe(one, spec), "version": f"llama-cpp-python {llama_cpp.__version__}",
            "settings": {"use_extra_bufts": extra_bufts, "mode": "sequential, one request at a time"}}


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    system = spec["system"]
    runners: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "hf": lambda s: hf(s, batched=False), "hf-batch": lambda s: hf(s, batched=True),
        "vllm": vllm, "llamacpp": llamacpp}
    try:
        emit("result", system=system, **runners[system](spec))
    except BaseException as e:  # the parent shows the reason; the traceback goes to the log
        traceback.print_exc()
        emit("error", system=system, message=f"{type(e).__name__}: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
