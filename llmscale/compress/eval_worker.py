"""One model's measurements for `llmscale eval`, run in a process of its own.

    python -m llmscale.compress.eval_worker SPEC.json RESULT.json

A fresh process per model keeps its load time and peak RSS its own. Progress goes to stdout
as one JSON line per finished stage; errors a user can fix exit 2 with one line on stderr.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

from llmscale.config import ConfigError, ModelConfig

STAGES = ("load", "perplexity", "greedy", "agreement", "tpot", "throughput")
HELDOUT = Path(__file__).resolve().parent.parent / "data" / "heldout.txt"
CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"


def count_parameters(cfg: ModelConfig) -> int:
    """Logical parameters of the architecture (a quantized checkpoint counts as its dense model)."""
    h, d, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size + 2 * h
    per_layer += (q + 2 * kv) if cfg.attention_bias else 0
    per_layer += 2 * d if cfg.qk_norm else 0
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return layers * per_layer + embeddings + h


def disk_bytes(model: str | None) -> int:
    """Bytes of the weights as stored: the .gguf file, or a folder's *.safetensors files."""
    from llmscale.model.lookup import default_model_path

    path = default_model_path() if model is None else Path(model)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def perplexity_windows(tokenizer: Any, window: int, max_windows: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of the held-out text, each starting with BOS when the
    tokenizer has one, so every window is scored the same way."""
    ids = tokenizer.encode(HELDOUT.read_text(), add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    body = window - len(bos)
    return [bos + ids[i:i + body] for i in range(0, len(ids) - body + 1, body)][:max_windows]


def perplexity(llm: Any, windows: list[list[int]]) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over every predicted token of every window."""
    from llmscale.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for window, out in zip(windows, outs, strict=True):
        for token, entry in zip(window[1:], out.prompt_logprobs[1:], strict=True):
            nll -= entry[token]
            count += 1
    return math.exp(nll / count), count


def agreement(llm: Any, prompts: list[list[int]], continuations: list[list[int]]) -> tuple[float, int]:
    """Teacher-forced top-1 agreement: fed prompt + reference continuation, the fraction of
    continuation positions where this model's argmax is the reference's token."""
    from llmscale.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": p + c} for p, c in zip(prompts, continuations, strict=True)],
                        params, use_tqdm=False)
    hits, total = 0, 0
    for prompt, cont, out in zip(prompts, continuations, outs, strict=True):
        for j, token in enumerate(cont):
            entry = out.prompt_logprobs[len(prompt) + j]
            hits += max(entry, key=entry.__getitem__) == token
            total += 1
    return hits / total, total


def greedy_continuations(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from llmscale.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def single_stream_tpot(llm: Any, prompt: list[int], tokens: int, repeats: int) -> float:
    """Median seconds per output token after the first, one request at a time."""
    import statistics

    from llmscale.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    tpots = []
    for _ in range(repeats):
        # Each repeat shifts the prompt by one token so the prefix cache cannot skip its prefill.
        prompt = prompt[1:] + prompt[:1]
        m = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].metrics
        tpots.append((m.last_token_s - m.first_token_s) / (tokens - 1))
    return statistics.median(tpots)


def batched_throughput(llm: Any, prompts: list[list[int]], tokens: int) -> float:
    """Output tokens per second with every request handed to the engine at once."""
    from llmscale.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def corpus_prompts(tokenizer: Any, count: int, length: int, offset: int) -> list[list[int]]:
    """`count` prompts of `length` tokens from evenly spaced places in the shipped corpus."""
    ids = tokenizer.encode(CORPUS.read_text()[offset:offset + 100_000], add_special_tokens=False)
    step = max(1, (len(ids) - length) // count)
    return [ids[i * step:i * step + length] for i in range(count)]


def peak_rss_bytes() -> int:
    """This process's peak resident set. Linux's ru_maxrss carries over the parent's peak at
    fork time (through exec), so a large parent would mask a small model; VmHWM belongs to this
    process's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def report(stage: str) -> None:
    print(json.dumps({"stage": stage}), flush=True)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from llmscale.engine.llm import LLM

    engine_args = {"kv_cache_memory": spec["kv_cache_memory"], "max_model_len": spec["max_model_len"]}
    engine_args.update(spec.get("engine_args") or {})
    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], **engine_args)
    load_s = time.perf_counter() - start
    engine = llm.llm_engine
    result: dict[str, Any] = {
        "model": spec["model"], "name": spec["name"], "load_s": load_s,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "parameters": count_parameters(engine.model_config), "disk_bytes": disk_bytes(spec["model"]),
    }
    report("load")
    windows = perplexity_windows(llm.tokenizer, spec["window"], spec["max_windows"])
    if not windows:
        raise ConfigError(f"held-out text is shorter than one {spec['window']}-token window")
    result["perplexity"], result["perplexity_tokens"] = perplexity(llm, windows)
    report("perplexity")
    # Fixed prompts, tokenized by this model's own tokenizer.
    prompts = corpus_prompts(llm.tokenizer, spec["num_prompts"], spec["prompt_len"], offset=0)
    result["prompts"] = prompts
    result["greedy"] = greedy_continuations(llm, prompts, spec["greedy_tokens"])
    report("greedy")
    # The reference scores itself too: teacher-forced argmax against its own free-running greedy
    # tokens, which is 1.0 unless batching changes a near-tie.
    own = {"prompts": prompts, "greedy": result["greedy"]}
    reference = own if spec["is_reference"] else spec["reference"]
    result["agreement"] = result["agreement_tokens"] = None
    if reference["prompts"] == prompts:  # else the tokenizers differ and ids can't be compared
        result["agreement"], result["agreement_tokens"] = agreement(llm, reference["prompts"],
                                                                    reference["greedy"])
    report("agreement")
    probe = corpus_prompts(llm.tokenizer, 1, spec["prompt_len"], offset=200_000)[0]
    single_stream_tpot(llm, probe, 4, 1)  # warm-up
    result["tpot_s"] = single_stream_tpot(llm, probe, spec["tpot_tokens"], spec["tpot_repeats"])
    report("tpot")
    batch = corpus_prompts(llm.tokenizer, spec["batch_size"], spec["prompt_len"], offset=300_000)
    result["throughput_tok_s"] = batched_throughput(llm, batch, spec["batch_tokens"])
    report("throughput")
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["vocab_size"] = engine.model_config.vocab_size
    return result


def main(argv: list[str]) -> None:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        result = run(json.loads(spec_path.read_text()))
    except ConfigError as e:
        print(f"{e}", file=sys.stderr)
        sys.exit(2)
    result_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
