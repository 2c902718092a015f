"""`LLM`: the offline API, shaped like vLLM's (`LLM(...).generate(prompts, params)`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmscale.config import ConfigError, EngineConfig
from llmscale.engine.llm_engine import LLMEngine
from llmscale.engine.outputs import RequestOutput
from llmscale.engine.sampling_params import SamplingParams
from llmscale.model.tokenizer import Tokenizer

PromptType = str | list[int] | dict[str, Any]
Messages = list[dict[str, str]]


class LLM:
    """Engine arguments are keyword arguments named like the CLI flags (`kv_cache_memory`,
    `max_num_batched_tokens`, `max_num_seqs`, `block_size`, `enable_prefix_caching`,
    `batching`, `max_model_len`, ...). `model=None` is the built-in default model."""

    def __init__(self, model: str | None = None, dtype: str | None = None, **engine_args: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model=model, dtype=dtype, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.llm_engine.tokenizer

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt: a string, a dict, or a list of token ids
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ConfigError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = [f"{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for rid, prompt, params in zip(ids, prompts, params_list, strict=True):
                engine.add_request(rid, prompt, params)
                added.append(rid)
        except Exception:
            for rid in added:  # a bad prompt leaves nothing of its batch behind
                engine.abort_request(rid)
            raise
        return self._run(ids, show_progress=use_tqdm and len(prompts) > 1)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        # Message text stays text: only the template's own markers become special tokens.
        encoded = [self.tokenizer.encode_chat(c, add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        token_prompts = [{"prompt": text, "prompt_token_ids": ids} for text, ids in encoded]
        return self.generate(token_prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], show_progress: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
                      disable=not show_progress, transient=True) as progress:
            task = progress.add_task("gen", total=len(ids), tps=0.0)
            start_tokens = engine.stats["generation_tokens"]
            while engine.has_unfinished_requests():
                for out in engine.step(include_unfinished=False):
                    done[out.request_id] = out
                elapsed = progress.tasks[0].elapsed or 1e-9
                progress.update(task, completed=len(done),
                                tps=(engine.stats["generation_tokens"] - start_tokens) / elapsed)
        return [done[i] for i in ids]
