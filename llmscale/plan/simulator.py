"""Serving in simulated time: the engine's real scheduler and KV cache, a modelled step time.

`SimEngine` is one replica. It holds a real `Scheduler` (whose clock is the simulation's)
over a real `KVCacheManager`, and steps exactly as `LLMEngine.step` does (schedule, advance
every scheduled request, append a token to each request that reached the end of its known
tokens, finish it at its length), except that no model runs: the step lasts what the
performance model says, and the token appended is a stand-in (a function of the prompt and
the position, so identical prompts still share blocks, as greedy decoding would make them).
A step is slowed by what is left of the server's work on the outputs of the step before
(`Handoff`: first tokens, finished requests), which on a few cores runs beside it.
Batching, chunked prefill, preemption and prefix caching therefore decide exactly as in
the engine. With pipeline parallelism it keeps micro-batches in flight as the engine does: up
to one per stage, each the scheduler's share of the running requests, and each passing the
stages in turn, a stage taking its share of the step's time once the micro-batch ahead of it
has left.

`simulate` is the discrete-event loop over arrivals and step ends of N replicas behind a
router (the cluster's routing policies), in the shape of `llmscale bench serve`: each request
gets TTFT, inter-token gaps and E2E as a client would measure them, and a `Run` comes out.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmscale.bench.arrivals import RateSchedule
from llmscale.bench.metrics import RequestResult, Run
from llmscale.bench.roofline import Chunk
from llmscale.config import SchedulerConfig
from llmscale.engine.kv_cache import KVCacheManager
from llmscale.engine.request import Request, RequestStatus
from llmscale.engine.sampling_params import SamplingParams
from llmscale.engine.scheduler import ScheduledBatch, make_scheduler
from llmscale.plan.step_model import StepModel

STAND_IN_VOCAB = 1 << 20  # stand-in output tokens never collide with another prompt's tokens
IDLE_POLL_S = 0.002  # a batching policy waiting for its batch: the engine loop polls this often


@dataclass(frozen=True)
class RequestOverhead:
    """How long a request takes to reach its engine (HTTP, tokenizing, a proxy), by whether the
    engine is stepping when it arrives: on a few cores that work waits for the step's threads."""

    idle_s: float = 0.0
    busy_s: float = 0.0

    @classmethod
    def fixed(cls, seconds: float) -> RequestOverhead:
        return cls(seconds, seconds)

    def plus(self, seconds: float) -> RequestOverhead:
        return RequestOverhead(self.idle_s + seconds, self.busy_s + seconds)


NO_REQUEST_OVERHEAD = RequestOverhead()
# A request's way in on catalogue hardware, whose host cores do not run the model.
CATALOGUE_REQUEST_OVERHEAD = RequestOverhead.fixed(0.002)


@dataclass(frozen=True)
class Handoff:
    """The server's work on a step's outputs that runs beside the engine's next step: a request's
    first token opens its stream, a finished one sends its last events and closes it. On a few
    cores that work slows the step it overlaps; an engine that idles meanwhile does not feel it."""

    first_token_s: float = 0.0
    finished_s: float = 0.0

    def seconds(self, first_tokens: int, finished: int) -> float:
        return self.first_token_s * first_tokens + self.finished_s * finished


NO_HANDOFF = Handoff()


@dataclass
class SimStep:
    batch: ScheduledBatch
    seconds: float  # the step model's time: every stage's share, one after another
    ends_s: float = 0.0  # when its last stage is done (behind the micro-batches ahead of it)


@dataclass
class Emitted:
    """A token reaching its request at the end of a step."""

    request_id: str
    finished: bool


class SimEngine:
    """One engine replica without a model (see the module docstring)."""

    def __init__(self, scheduler_config: SchedulerConfig, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool, max_model_len: int, step_model: StepModel,
                 stages: int = 1, handoff: Handoff = NO_HANDOFF) -> None:
        self.now = 0.0
        self.max_model_len = max_model_len
        self.step_model = step_model
        self.handoff = handoff
        self.handoff_until = 0.0  # when the server is done with the outputs handed to it so far
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = make_scheduler(scheduler_config, self.kv, clock=lambda: self.now)
        self.stand_in_seeds: dict[str, int] = {}  # request id -> what its stand-in tokens hash
        # Pipeline parallelism, as the engine runs it: up to `stages` micro-batches in flight,
        # each the scheduler's share of the running requests, none sharing a request.
        self.stages = stages
        self.scheduler.micro_batches = stages
        self.stage_free = [0.0] * stages  # when each stage is done with what it was given
        self.flights: deque[SimStep] = deque()  # launched, not ended; oldest first

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], max_tokens: int,
                    arrival_s: float | None = None) -> None:
        """As `LLMEngine.add_request` for one sample, greedy, ignoring EOS."""
        ids = list(prompt_token_ids)
        room = self.max_model_len - len(ids)
        if not ids or room < 1:
            raise ValueError(f"request {request_id}: {len(ids)} prompt tokens do not fit "
                             f"max_model_len {self.max_model_len}")
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        req = Request(f"{request_id}#0", ids, params, min(max_tokens, room),
                      arrival_time_s=self.now if arrival_s is None else arrival_s,
                      parent_id=request_id, index=0)
        self.stand_in_seeds[req.request_id] = hash(tuple(ids))
        self.scheduler.add(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def load(self) -> tuple[int, int, float]:
        """(waiting, running, KV usage), what replicas report to the router."""
        return len(self.scheduler.waiting), len(self.scheduler.running), self.kv.usage

    def launch(self) -> SimStep:
        """Schedule one (micro-)batch at `now` and price it: it passes the stages in turn, each
        taking its share of the step model's time once the micro-batch ahead has left it.
        Nothing advances until `end_step`; an empty batch is not launched."""
        batch = self.scheduler.schedule()
        chunks = [Chunk(*shape) for shape in batch.shapes()]
        step = SimStep(batch, self.step_model.step_seconds(chunks) if chunks else 0.0, self.now)
        if not batch:
            return step
        step.seconds += max(0.0, self.handoff_until - self.now)  # what of the server's work overlaps it
        self.handoff_until = self.now
        per_stage = step.seconds / self.stages
        for k in range(self.stages):
            step.ends_s = self.stage_free[k] = max(step.ends_s, self.stage_free[k]) + per_stage
        self.scheduler.in_flight.update(r.request_id for r, _ in batch.scheduled)
        self.flights.append(step)
        return step

    def end_step(self) -> list[Emitted]:
        """End the oldest micro-batch in flight, as LLMEngine.step does after the model ran."""
        step = self.flights.popleft()
        self.scheduler.in_flight.difference_update(r.request_id for r, _ in step.batch.scheduled)
        for req, n in step.batch.scheduled:
            req.num_computed_tokens += n
        # The runner's row order: decodes first, then prefill chunks, each in scheduled order.
        ordered = ([r for r, n in step.batch.scheduled if n == 1]
                   + [r for r, n in step.batch.scheduled if n > 1])
        emitted = []
        first_tokens = 0
        for req in ordered:
            if req.num_computed_tokens != req.num_tokens:
                continue
            req.append_token(hash((self.stand_in_seeds[req.request_id], req.num_tokens)) % STAND_IN_VOCAB)
            first_tokens += len(req.output_token_ids) == 1
            done = len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len
            if done:
                self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
                del self.stand_in_seeds[req.request_id]
            emitted.append(Emitted(req.group_id, done))
        finished = sum(e.finished for e in emitted)
        self.handoff_until = max(self.handoff_until, self.now) + self.handoff.seconds(first_tokens, finished)
        return emitted

    def step(self) -> tuple[SimStep, list[Emitted]]:
        """As `LLMEngine.step`: launch micro-batches until `stages` are in flight or nothing is
        left to schedule, then end the oldest; the clock moves to its end."""
        step = SimStep(ScheduledBatch(), 0.0, self.now)
        while len(self.flights) < self.stages and (step := self.launch()).batch:
            pass
        if not self.flights:
            return step, []
        oldest = self.flights[0]
        self.now = max(self.now, oldest.ends_s)
        return oldest, self.end_step()


# ----- routing -----------------------------------------------------------------------------

Route = Callable[[list[int], list[SimEngine], dict[int, int]], int]  # -> replica index


def make_router(policy: str, seed: int = 0) -> Route:
    """The cluster's routing policies over simulated replicas' live load (their reports
    are taken as fresh: the cluster's arrive up to a second late)."""
    rng = random.Random(seed)
    state: dict[str, object] = {}

    def route(prompt: list[int], replicas: list[SimEngine], inflight: dict[int, int]) -> int:
        if len(replicas) == 1:
            return 0
        from llmscale.cluster import routing  # Ray Serve's router API comes with it: only when needed

        if policy == "round-robin":
            rr = state.setdefault("rr", routing.RoundRobin())
            return rr.rank(list(range(len(replicas))))[0]  # type: ignore[attr-defined]
        scores = {i: routing.load_score(routing.ReplicaLoad(*e.load), inflight.get(i, 0))
                  for i, e in enumerate(replicas)}
        if policy == "pow2":
            return routing.pow2_rank(scores, rng)[0]
        prefix = state.setdefault("prefix", routing.PrefixPolicy(rng=rng))
        hashes = routing.block_hashes(prompt)
        pick = prefix.rank(scores, hashes)[0]  # type: ignore[attr-defined]
        prefix.record(pick, hashes)  # type: ignore[attr-defined]
        return int(pick)

    return route


ROUTING_POLICIES = ("prefix", "pow2", "round-robin")


# ----- the event loop ----------------------------------------------------------------------

@dataclass
class SimWorkload:
    prompts: list[list[int]]  # token ids as the server would encode them
    max_tokens: list[int]
    arrivals: list[float]  # planned send times from the run's start, non-decreasing


@dataclass
class _Replica:
    engine: SimEngine
    inbox: list[tuple[str, list[int], int, float]] = field(default_factory=list)
    launch_at: float | None = None  # a LAUNCH event waits for stage 0 to be free at this time


def simulate(make_engine: Callable[[], SimEngine], num_replicas: int, workload: SimWorkload,
             route: Route, label: str, rate: float, burstiness: float, seed: int,
             max_concurrency: int | None = None, request_overhead: RequestOverhead = NO_REQUEST_OVERHEAD,
             on_done: Callable[[], None] = lambda: None,
             rate_schedule: RateSchedule | None = None) -> Run:
    """One load run in simulated time. `request_overhead` counts in TTFT and E2E."""
    replicas = [_Replica(make_engine()) for _ in range(num_replicas)]
    n = len(workload.prompts)
    results = [RequestResult(i, len(p), m, at) for i, (p, m, at) in
               enumerate(zip(workload.prompts, workload.max_tokens, workload.arrivals, strict=True))]
    inflight: dict[int, int] = {}
    replica_of: dict[int, int] = {}  # request index (its id, as text) -> replica
    last_token: dict[str, float] = {}
    events: list[tuple[float, int, int, int]] = []  # (time, order, kind, payload)
    order = 0
    ARRIVE, DELIVER, STEP_END, POLL, LAUNCH = 0, 1, 2, 3, 4
    cap = max_concurrency or n
    queued: list[int] = []  # requests waiting for a concurrency slot
    active = 0

    def push(t: float, kind: int, payload: int) -> None:
        nonlocal order
        heapq.heappush(events, (t, order, kind, payload))
        order += 1

    def send(i: int, t: float) -> None:
        nonlocal active
        active += 1
        results[i].start_s = t
        k = route(workload.prompts[i], [r.engine for r in replicas], inflight)
        inflight[k] = inflight.get(k, 0) + 1
        replica_of[i] = k
        busy = bool(replicas[k].engine.flights)
        push(t + (request_overhead.busy_s if busy else request_overhead.idle_s), DELIVER, i)

    def pump(k: int, t: float) -> None:
        """Launch what replica k can now: as many micro-batches as it keeps in flight, each once
        stage 0 is free (one step at a time without pipeline parallelism)."""
        rep = replicas[k]
        eng = rep.engine
        eng.now = t
        for rid, prompt, max_tokens, at in rep.inbox:
            eng.add_request(rid, prompt, max_tokens, at)
        rep.inbox.clear()
        while len(eng.flights) < eng.stages and eng.has_unfinished_requests():
            if eng.stage_free[0] > t:
                if rep.launch_at != eng.stage_free[0]:
                    rep.launch_at = eng.stage_free[0]
                    push(rep.launch_at, LAUNCH, k)
                return
            step = eng.launch()
            if not step.batch:
                if not eng.flights:
                    push(t + IDLE_POLL_S, POLL, k)  # a request-level policy waits for its batch
                return
            push(step.ends_s, STEP_END, k)

    for i, at in enumerate(workload.arrivals):
        push(at, ARRIVE, i)
    end = 0.0
    while events:
        t, _, kind, payload = heapq.heappop(events)
        if kind == ARRIVE:
            if active < cap:
                send(payload, t)
            else:
                queued.append(payload)
            continue
        if kind == DELIVER:
            k = replica_of[payload]
            prompt, max_tokens = workload.prompts[payload], workload.max_tokens[payload]
            replicas[k].inbox.append((str(payload), prompt, max_tokens, t))
            pump(k, t)
            continue
        rep = replicas[payload]
        if kind == POLL:
            if not rep.engine.flights:
                pump(payload, t)
            continue
        if kind == LAUNCH:
            if rep.launch_at == t:
                rep.launch_at = None
                pump(payload, t)
            continue
        rep.engine.now = t
        for e in rep.engine.end_step():
            i = int(e.request_id)
            k = replica_of[i]
            res = results[i]
            if res.ttft_s is None:
                res.ttft_s = t - res.start_s
            else:
                res.itl_s.append(t - last_token[e.request_id])
            last_token[e.request_id] = t
            res.output_tokens += 1
            if e.finished:
                res.e2e_s = t - res.start_s
                res.success = True
                res.usage_reported = True
                inflight[k] -= 1
                active -= 1
                end = max(end, t)
                del last_token[e.request_id]
                on_done()
                if queued:
                    send(queued.pop(0), t)
        pump(payload, t)
    return Run(label, rate, burstiness, max_concurrency, seed, end, results, rate_schedule=rate_schedule)
