"""Single-stream decode speed of several models, back to back in one process.

    python benchmarks/tpot.py [MODEL[:dtype] ...] [--tokens 64] [--repeats 3] [--keep-quantized]

MODEL is an HF folder or .gguf file, or `default` for the built-in model; `:bfloat16` or
`:float32` picks the dtype (default float32). TPOT is the time per token after the first of
one request (128-token prompt, `--tokens` generated, EOS ignored), median of `--repeats`, each on
a fresh prompt so no prefix cache serves it. `llmscale eval` measures the same and much more;
this is the quick check to run before and after a change to the decode path.
"""

from __future__ import annotations

import argparse
import gc
import statistics

from llmscale import LLM, SamplingParams

PROMPT_LEN = 128


def tpot_ms(llm: LLM, tokens: int, repeats: int) -> list[float]:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate([[1] + [504] * (PROMPT_LEN - 1)], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    times = []
    for i in range(repeats):
        prompt = {"prompt_token_ids": [1] + [600 + i] * (PROMPT_LEN - 1)}
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        m = out.metrics
        assert m is not None and m.first_token_s is not None and m.last_token_s is not None
        times.append((m.last_token_s - m.first_token_s) / (tokens - 1) * 1000)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=["default"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep-quantized", action="store_true", help="serve GGUF weights quantized")
    args = ap.parse_args()
    for spec in args.models:
        name, _, dtype = spec.partition(":")
        llm = LLM(model=None if name == "default" else name, dtype=dtype or "float32",
                  kv_cache_memory="256MiB", max_model_len=1024, keep_quantized=args.keep_quantized)
        times = tpot_ms(llm, args.tokens, args.repeats)
        print(f"{spec}: TPOT {statistics.median(times):.1f} ms (runs: "
              f"{', '.join(f'{t:.1f}' for t in times)})", flush=True)
        del llm
        gc.collect()


if __name__ == "__main__":
    main()
