"""`LLMEngine`: the synchronous step loop (schedule -> run model -> sample -> check stops)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from llmscale.config import (
    ConfigError,
    EngineConfig,
)
from llmscale.engine.kv_cache import KVCacheManager
from llmscale.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from llmscale.engine.request import Request, RequestStatus
from llmscale.engine.runner import ModelRunner, StepResult
from llmscale.engine.sampler import Sampler, SamplingRow
from llmscale.engine.sampling_params import SamplingParams
from llmscale.engine.scheduler import ScheduledBatch, make_scheduler
from llmscale.engine.shard import Phases, load_rank_model
from llmscale.kernels import cpu as cpu_kernels
from llmscale.model.loader import read_model_config
from llmscale.model.lookup import resolve_model
from llmscale.model.tokenizer import IncrementalDetokenizer, Tokenizer
from llmscale.parallel.pipeline import PipelineDriver
from llmscale.parallel.step_delta import DeltaEncoder
from llmscale.parallel.workers import WorkerDiedError, context_of, stage_link, start_workers, threads_per_rank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineState:
    """What an engine is doing now: what metrics export, and what a cluster routes and scales on."""

    running: int
    waiting: int
    kv_usage: float  # fraction of KV blocks in use
    prefix_hit_rate: float  # fraction of looked-up prompt tokens found in the prefix cache
    num_preemptions: int
    requests_served: int  # finished requests (groups of n samples count once)


def tokenize_prompt(tokenizer: Tokenizer, prompt: str | list[int] | dict[str, Any]
                    ) -> tuple[str | None, list[int]]:
    """(prompt text if known, token ids) of a text, token ids, or {"prompt", "prompt_token_ids"}."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        prompt = prompt["prompt"]
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    return None, list(prompt)


class LLMEngine:
    def __init__(self, config: EngineConfig, stream_text: bool = False, online: bool = False) -> None:
        """`stream_text`: detokenize every step (servers); otherwise text is decoded once at the
        end unless stop strings need it earlier. `online`: a server's defaults (token budget)."""
        start = time.perf_counter()
        phases = Phases()
        self.config = config
        self.stream_text = stream_text
        self.model_path = resolve_model(config.model, config.keep_quantized)
        self.model_name = config.model_name
        self.dtype = config.torch_dtype
        self.device = config.torch_device
        if config.stream_weights and self.device.type != "cpu":
            raise ConfigError("stream_weights applies to the CPU: a GPU engine captures its decode steps "
                              "from the loaded weights")
        torch.manual_seed(config.seed)
        self.tokenizer = Tokenizer.from_folder(self.model_path)
        model_cfg = read_model_config(self.model_path)
        parallel = config.parallel
        parallel.check_model(model_cfg)
        world = parallel.world_size
        if world > 1 and config.stream_weights:
            raise ConfigError("stream_weights loads one engine's layers on a thread; it does not apply "
                              "with tensor_parallel_size or pipeline_parallel_size > 1")
        self.max_model_len = model_cfg.context_len(config.max_model_len)
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
        phases.lap("checkpoint")
        if self.device.type == "cpu":
            cpu_kernels.library()  # built once per machine and cached on disk, or loaded from there
            phases.lap("kernels")
        scheduler_config = config.scheduler.resolved(self.device, online)
        # Ranks 1..T*P-1 load their parts in their own processes while this one loads rank 0's.
        self.workers = self.pipeline = None
        if world > 1:
            max_bytes = scheduler_config.max_num_batched_tokens * model_cfg.hidden_size * 4
            self.workers = start_workers(config, self.model_path, self.max_model_len, max_bytes)
        self._threads_before = torch.get_num_threads()
        try:
            if self.workers is not None:
                torch.set_num_threads(threads_per_rank(world, config.rank_cores(0)))
            shard = load_rank_model(config, self.model_path, self.max_model_len, 0, phases)
            num_blocks = shard.kv_capacity
            if self.workers is not None:
                capacity = min(num_blocks, self.workers.wait_loaded())
                num_blocks = self.workers.join_group(shard.model, self.device, capacity)
        except BaseException:
            self.shutdown()
            raise
        self.model, self.model_config, self.load_time_s = shard.model, shard.model_config, shard.load_time_s
        self.layer_load, self._prepacked_now = shard.layer_load, shard.prepacked_bytes
        self.delta = DeltaEncoder() if self.workers is not None else None

        cache = config.cache
        self.num_blocks = num_blocks
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = make_scheduler(scheduler_config, self.kv)
        cores = config.rank_cores(0)
        self.runner = ModelRunner(self.model, cache.block_size, num_blocks, shard.kv_dtype,
                                  self.device, cores if self.device.type == "cpu" else None,
                                  context_of(parallel, 0))
        if self.device.type == "cuda" and not config.enforce_eager and world == 1:
            self.runner.use_decode_graphs(self.scheduler.config.max_num_seqs, self.max_model_len)
        link = stage_link(self.model, parallel, 0)
        if link is not None:
            self.pipeline = PipelineDriver(self.runner, link, parallel.pipeline_parallel_size)
            self.scheduler.micro_batches = parallel.pipeline_parallel_size
        phases.lap("kv_cache")
        self.sampler = Sampler(seed=config.seed,
                               cpu_argmax=self.device.type == "cpu" and cpu_kernels.available())
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.requests: dict[str, Request] = {}
        self.groups: dict[str, list[Request]] = {}  # parent id -> its n samples
        self.group_prompts: dict[str, str | None] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        # Line-buffered: each step's line is on disk when the step returns.
        self.step_log = open(config.log_steps, "a", buffering=1) if config.log_steps else None  # noqa: SIM115
        self._last_step_end = 0.0  # when the last pipelined step returned
        self.stats: dict[str, float] = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                                        "decode_steps": 0, "decode_step_s": 0.0, "requests_served": 0}
        self.startup_time_s = time.perf_counter() - start
        phases.lap("other")
        self.startup_phases = phases.seconds  # where the start-up went (`cluster coldstart` shows it)
        log.info("engine ready in %.2fs (weights %.2fs), %d KV blocks of %d tokens, %d tokens per step",
                 self.startup_time_s, self.load_time_s, num_blocks, cache.block_size,
                 self.scheduler.config.max_num_batched_tokens)

    def shutdown(self) -> None:
        """Stop the worker ranks, if any, and close the step log (idempotent); the engine cannot
        step after."""
        if getattr(self, "step_log", None) is not None:
            self.step_log.close()
            self.step_log = None
        if getattr(self, "workers", None) is not None:
            if self.pipeline is not None:
                try:  # the micro-batches still in flight: their last stage waits to hand over logits
                    while self.pipeline.in_flight:
                        self.pipeline.collect()
                    self.pipeline.link.flush()
                except (RuntimeError, OSError) as e:
                    log.warning("draining the pipeline: %s", e)
            self.workers.shutdown()
            self.workers = None
            torch.set_num_threads(self._threads_before)

    @property
    def prepacked_bytes(self) -> int:
        """Bytes of weights copied into a GEMM's packed layout so far (streamed layers add theirs
        as they arrive; a bf16 model's fused decode step holds its own)."""
        fused = self.runner.fused.packed_bytes if self.runner.fused is not None else 0
        return self._prepacked_now + self.layer_load.finished_bytes + fused

    # ----- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int] | dict[str, Any],
                    params: SamplingParams | None = None, arrival_time_s: float | None = None) -> None:
        """Queues the request's n samples together; if any of them is invalid, none is queued."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise ConfigError(f"request id {request_id!r} is already in use")
        text, ids = tokenize_prompt(self.tokenizer, prompt)
        self._check_prompt(ids)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        arrival = time.monotonic() if arrival_time_s is None else arrival_time_s
        # Unique while group ids are: i is what follows the last '#'. Nothing parses these ids.
        members = [Request(f"{request_id}#{i}", ids, params.for_sample(i), max_tokens,
                           self.eos_token_ids, arrival, parent_id=request_id, index=i)
                   for i in range(params.n)]
        detokenizers = {m.request_id: IncrementalDetokenizer(
            self.tokenizer, ids, skip_special_tokens=m.sampling_params.skip_special_tokens)
            for m in members if self.stream_text or m.sampling_params.stop}
        for req in members:
            self.requests[req.request_id] = req
            self.scheduler.add(req)
        self.detokenizers.update(detokenizers)
        self.groups[request_id] = members
        self.group_prompts[request_id] = text

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ConfigError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ConfigError(f"prompt token ids must lie in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ConfigError(
                f"prompt has {len(ids)} tokens but the context window is {self.max_model_len} "
                f"(at least one must be left to generate)")

    def abort_request(self, request_id: str) -> None:
        for req in self.groups.pop(request_id, []):
            if not req.is_finished:
                self.scheduler.abort(req)
            self._forget(req)
        self.group_prompts.pop(request_id, None)

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        self.detokenizers.pop(req.request_id, None)

    def state(self) -> EngineState:
        """A snapshot; read from another thread it may be a step stale, never torn per field."""
        sched, kv = self.scheduler, self.kv
        return EngineState(running=len(sched.running), waiting=len(sched.waiting), kv_usage=kv.usage,
                           prefix_hit_rate=kv.prefix_hit_rate, num_preemptions=sched.num_preemptions,
                           requests_served=int(self.stats["requests_served"]))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.pipeline and self.pipeline.in_flight)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ----- the step ---------------------------------------------------------------------------

    def step(self, include_unfinished: bool = True) -> list[RequestOutput]:
        """One iteration. Returns outputs of groups that changed (or only finished ones)."""
        if self.pipeline is not None:
            return self._pipelined_step(include_unfinished)
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        shapes, decodes = batch.shapes() if self.step_log else None, self._decodes(batch)
        try:
            return self._finish(batch, self._execute(batch), include_unfinished)
        finally:
            self._log_step(decodes, shapes, time.perf_counter() - start)

    def _pipelined_step(self, include_unfinished: bool) -> list[RequestOutput]:
        """Launch micro-batches until P are in flight or no request is left to schedule, then
        finish the oldest: its stage 0 ran here, its later stages on the workers meanwhile."""
        pipe = self.pipeline
        assert pipe is not None
        try:
            while not pipe.full:
                batch = self.scheduler.schedule()
                if not batch:
                    break
                self.scheduler.in_flight.update(r.request_id for r, _ in batch.scheduled)
                self.workers.send(self.delta.encode(batch, self.kv))
                pipe.launch(batch, self.kv, time.perf_counter())
            if not pipe.in_flight:
                return []
            flight, result = pipe.collect()
        except (RuntimeError, OSError) as e:  # a pipe or transfer failed: name the rank that died
            self.workers.check()
            raise WorkerDiedError(f"pipeline-parallel step failed: {e}") from e
        batch = flight.batch
        self.scheduler.in_flight.difference_update(r.request_id for r, _ in batch.scheduled)
        shapes, decodes = batch.shapes() if self.step_log else None, self._decodes(batch)
        # The step's share of the wall time: since this micro-batch launched or the last step
        # returned, whichever came later; the shares add up to the time spent.
        start = max(flight.launched_s, self._last_step_end)
        try:
            return self._finish(batch, result, include_unfinished)
        finally:
            self._last_step_end = time.perf_counter()
            self._log_step(decodes, shapes, self._last_step_end - start)

    @staticmethod
    def _decodes(batch: ScheduledBatch) -> bool:
        """Whether the step (not yet finished) decodes some request. Such a step is the gap
        between that request's tokens: over such steps, seconds per step is the TPOT of the
        requests running now (the autoscaler reads it)."""
        return any(r.output_token_ids and n == 1 and r.num_computed_tokens + 1 == r.num_tokens
                   for r, n in batch.scheduled)

    def _log_step(self, decodes: bool, shapes: list | None, seconds: float) -> None:
        if decodes:
            self.stats["decode_steps"] += 1
            self.stats["decode_step_s"] += seconds
        if self.step_log is not None:
            self.step_log.write(json.dumps([time.time(), seconds, shapes]) + "\n")

    def _finish(self, batch: ScheduledBatch, result: StepResult, include_unfinished: bool
                ) -> list[RequestOutput]:
        for req, start, logits in result.prompt_logits:
            self._record_prompt_logprobs(req, start, logits)
        logits, sampled = result.logits, result.sampled
        for req, n in batch.scheduled:
            req.num_computed_tokens += n
            if req.num_computed_tokens <= req.num_prompt_tokens and req.num_preemptions == 0:
                self.stats["prompt_tokens"] += n
        self.stats["steps"] += 1
        if logits is None:
            return []
        if any(r.is_finished for r in sampled):  # aborted while its micro-batch was in flight
            keep = [i for i, r in enumerate(sampled) if not r.is_finished]
            logits, sampled = logits[keep], [sampled[i] for i in keep]
        rows = [SamplingRow(r.sampling_params, r.output_token_ids, r.prompt_token_ids, r.generator,
                            r.eos_token_ids) for r in sampled]
        results = self.sampler(logits, rows)
        now = time.monotonic()
        changed: dict[str, None] = {}
        for req, res in zip(sampled, results, strict=True):
            self._append(req, res.token_id, res.logprob, res.top_logprobs, now)
            changed[req.group_id] = None
        self.stats["generation_tokens"] += len(sampled)
        outputs = []
        for gid in changed:
            members = self.groups.get(gid)
            if members is None:
                continue
            finished = all(m.is_finished for m in members)
            if finished or include_unfinished:
                outputs.append(self._make_output(gid, members, finished))
            if finished:
                self.stats["requests_served"] += 1
                for m in members:
                    self._forget(m)
                del self.groups[gid]
                self.group_prompts.pop(gid, None)
        return outputs

    def _execute(self, batch: ScheduledBatch) -> StepResult:
        """Run the model over the batch: here, and on every other rank in step."""
        if self.workers is None:
            return self.runner.execute(batch, self.kv)
        try:
            self.workers.send(self.delta.encode(batch, self.kv))
            result = self.runner.execute(batch, self.kv)
        except (RuntimeError, OSError) as e:  # a pipe or collective failed: name the rank that died
            self.workers.check()
            raise WorkerDiedError(f"parallel step failed: {e}") from e
        assert result is not None  # rank 0 samples
        return result

    @staticmethod
    def _record_prompt_logprobs(req: Request, start: int, logits: torch.Tensor) -> None:
        assert req.prompt_logprobs is not None
        k = req.sampling_params.prompt_logprobs or 0
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(req.prompt_token_ids[start + 1:start + 1 + logits.shape[0]])
        actual = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top_vals, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        for i, (target, lp) in enumerate(zip(targets.tolist(), actual, strict=True)):
            if start + 1 + i != len(req.prompt_logprobs):
                continue  # already recorded before a preemption recomputed this prefix
            entry = dict(zip(top_ids[i].tolist(), top_vals[i].tolist(), strict=True)) if k else {}
            entry[target] = lp
            req.prompt_logprobs.append(entry)

    def _append(self, req: Request, token: int, logprob: float | None,
                top: list[tuple[int, float]] | None, now: float) -> None:
        req.append_token(token)
        if req.times.first_token_s is None:
            req.times.first_token_s = now
        req.times.last_token_s = now
        if req.logprobs is not None and logprob is not None:
            entry = dict(top or [])
            entry[token] = logprob
            req.logprobs.append(entry)
            req.sampled_logprobs.append(logprob)
        params = req.sampling_params
        status: RequestStatus | None = None
        if not params.ignore_eos and token in req.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif token in params.stop_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
        detok = self.detokenizers.get(req.request_id)
        if detok is not None:
            req.output_text += detok.add(token)
            if status is None and params.stop:
                status = self._check_stop_strings(req)
        if status is None and (len(req.output_token_ids) >= req.max_tokens
                               or req.num_tokens >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if detok is not None and not isinstance(req.stop_reason, str):
                # Text held back for a half-finished character; a stop string already cut it.
                req.output_text += detok.flush()
            req.times.finished_s = now
            self.scheduler.finish(req, status)

    @staticmethod
    def _check_stop_strings(req: Request) -> RequestStatus | None:
        params = req.sampling_params
        # A stop string can only newly end in the text added this step: search a short tail.
        window = max(len(s) for s in params.stop) + 16
        start = max(0, len(req.output_text) - window)
        best: tuple[int, str] | None = None
        for stop in params.stop:
            i = req.output_text.find(stop, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        i, stop = best
        req.output_text = req.output_text[: i + len(stop) if params.include_stop_str_in_output else i]
        req.stop_reason = stop
        return RequestStatus.FINISHED_STOPPED

    def _make_output(self, gid: str, members: list[Request], finished: bool) -> RequestOutput:
        outs = []
        for m in members:
            text = m.output_text
            if m.request_id not in self.detokenizers and m.is_finished:
                text = self.tokenizer.decode(m.output_token_ids,
                                             skip_special_tokens=m.sampling_params.skip_special_tokens)
                m.output_text = text
            outs.append(CompletionOutput(
                index=m.index, text=text, token_ids=list(m.output_token_ids),
                cumulative_logprob=sum(m.sampled_logprobs) if m.logprobs is not None else None,
                logprobs=list(m.logprobs) if m.logprobs is not None else None,
                finish_reason=m.finish_reason, stop_reason=m.stop_reason))
        first = members[0]
        t = first.times
        metrics = RequestMetrics(t.arrival_s, t.first_scheduled_s, t.first_token_s, t.last_token_s,
                                 t.finished_s, first.num_cached_tokens,
                                 sum(m.num_preemptions for m in members))
        prompt_logprobs = list(first.prompt_logprobs) if first.prompt_logprobs is not None else None
        return RequestOutput(gid, self.group_prompts.get(gid), first.prompt_token_ids, outs,
                             finished, metrics, prompt_logprobs)
