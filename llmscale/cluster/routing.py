"""Which engine replica serves a request: prefix affinity, bounded by load.

Every replica reports its queues and KV usage through `record_routing_stats` (`ReplicaLoad`);
the router adds what it knows sooner: requests it sent that have not completed. `PrefixPolicy`
remembers, per replica, the chained block hashes of the prompts it sent there (an LRU about the
size of a replica's KV cache) and sends a request where the longest run of its leading blocks
already is, among replicas whose load is within a guard of the least loaded; with no match it
draws two replicas at random and takes the less loaded (`pow2_rank`). The policies are plain objects of
observable state. The Ray Serve `RequestRouter` classes at the bottom only translate: they read
stats and the `ReplicaRequest`, ask a policy, and hand its ranking back as singleton ranks.
"""

from __future__ import annotations

import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from llmscale.engine.kv_cache import hash_block

K = TypeVar("K", bound=Hashable)  # a replica's key: ReplicaID under Ray, any hashable in tests

BLOCK_SIZE = 16  # tokens per hashed block, the engine's default (CacheConfig.block_size)
MAX_BLOCKS_PER_REPLICA = 4096  # remembered hashes per replica: 64k tokens, a CPU replica's cache

WAITING_WEIGHT = 2.0  # a waiting request delays everyone behind it; a running one shares steps
KV_SOFT_LIMIT = 0.8  # past this a new prompt evicts cached prefixes, and near 1.0 it preempts
KV_FULL_PENALTY = 8.0  # a full cache looks like four more waiting requests

# A prefix hit saves the shared prompt's prefill. With short queues that is worth waiting behind
# two more requests (4 score units); with long queues the allowed excess grows with the mean: with
# two replicas, high - low <= (high + low) / 2 caps the replica holding a hot prefix at 3/4 of the
# queued work. A tighter guard (2 units, half the mean) spilled prefixes between replicas under
# ordinary load and cut the hit rate's gain over round-robin (BENCHMARKS.md, cluster routing).
GUARD_MIN_SLACK = 4.0
GUARD_MEAN_FRACTION = 1.0

# A pick never confirmed as sent stops counting after this; by then a request that did go out
# shows in its replica's own report (sent every request_routing_stats_period_s, 10 s by default).
PROVISIONAL_TTL_S = 30.0


@dataclass
class ReplicaRequest:
    """The one positional argument every engine replica call receives."""

    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str | None
    params: Any  # llmscale SamplingParams; the router never reads it


@dataclass(frozen=True)
class ReplicaLoad:
    """What routing reads of a replica's last report (`EngineReplica.record_routing_stats`:
    its `EngineState` fields, by name); an empty report (none yet) reads as idle."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any] | None) -> ReplicaLoad:
        stats = stats or {}
        values = {}
        for name, default in asdict(cls()).items():
            value = stats.get(name)
            values[name] = default if value is None else type(default)(value)
        return cls(**values)

    def recounted(self, ongoing: int) -> ReplicaLoad:
        """This load with `ongoing` requests, a count fresher than the report, split as the report
        splits them: up to its running count run, the rest wait. A report up to a period old
        still shows requests finished since; a fresh count does not."""
        running = min(self.running, ongoing)
        return ReplicaLoad(waiting=ongoing - running, running=running, kv_usage=self.kv_usage)


def load_score(load: ReplicaLoad, inflight: int = 0) -> float:
    """How long a new request would wait here, in units of one running request.

    `inflight` is a fresher count of the replica's requests than its report. The two overlap
    once the report catches up, so only the excess counts, as arrivals: waiting.
    """
    waiting = load.waiting + max(0, inflight - load.waiting - load.running)
    kv_pressure = min(1.0, max(0.0, load.kv_usage - KV_SOFT_LIMIT) / (1.0 - KV_SOFT_LIMIT))
    return WAITING_WEIGHT * waiting + load.running + KV_FULL_PENALTY * kv_pressure


def within_guard(scores: Mapping[K, float]) -> list[K]:
    """Replicas loaded little enough above the least loaded for a prefix hit to pay."""
    if not scores:
        return []
    low = min(scores.values())
    slack = max(GUARD_MIN_SLACK, GUARD_MEAN_FRACTION * sum(scores.values()) / len(scores))
    return [r for r, s in scores.items() if s - low <= slack]


def pow2_rank(scores: Mapping[K, float], rng: random.Random) -> list[K]:
    """Two distinct replicas drawn at random, the less loaded first (a tie keeps the draw)."""
    replicas = list(scores)
    if len(replicas) < 2:
        return replicas
    a, b = rng.sample(replicas, 2)
    return [b, a] if scores[b] < scores[a] else [a, b]


def block_hashes(token_ids: Sequence[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """Chained hashes of the prompt's full blocks, as the engine's prefix cache computes them.

    On Python 3.11 `hash(None)` differs between processes, so compare only hashes computed in
    the same process: the router matches its own, never a replica's.
    """
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, tuple(token_ids[start:start + block_size])))
    return hashes


class RoundRobin:
    """Each call starts one replica further along the candidate list."""

    def __init__(self, start: int = 0) -> None:
        self.next = start

    def rank(self, replicas: Sequence[K]) -> list[K]:
        if not replicas:
            return []
        i = self.next % len(replicas)
        self.next += 1
        return [*replicas[i:], *replicas[:i]]


class PrefixMemory:
    """Per replica, an LRU of the block hashes of prompts sent there."""

    def __init__(self, max_blocks: int = MAX_BLOCKS_PER_REPLICA) -> None:
        self.max_blocks = max_blocks
        self.by_replica: dict[Hashable, OrderedDict[int, None]] = {}

    def record(self, replica: Hashable, hashes: Sequence[int]) -> None:
        lru = self.by_replica.setdefault(replica, OrderedDict())
        # Leading blocks go in last so they are evicted last: the engine's pool also frees a
        # block table tail first, and a match needs an unbroken run from the first block.
        for h in reversed(hashes):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.max_blocks:
            lru.popitem(last=False)

    def match(self, replica: Hashable, hashes: Sequence[int]) -> int:
        """How many leading blocks of the prompt this replica was sent before."""
        lru = self.by_replica.get(replica, {})
        n = 0
        while n < len(hashes) and hashes[n] in lru:
            n += 1
        return n

    def forget(self, replica: Hashable) -> None:
        self.by_replica.pop(replica, None)

    def retain(self, replicas: Iterable[Hashable]) -> None:
        keep = set(replicas)
        for replica in [r for r in self.by_replica if r not in keep]:
            del self.by_replica[replica]


class PrefixPolicy:
    """The longest remembered prefix among replicas within the guard, else pow2.

    Filtering by the guard before matching (rather than refusing the longest match outright)
    lets a hot prefix spill to a replica holding a shorter part of it before falling back to
    pow2; once spilled, that replica holds the prefix too, and equal matches go to the less
    loaded.
    """

    def __init__(self, max_blocks_per_replica: int = MAX_BLOCKS_PER_REPLICA,
                 rng: random.Random | None = None) -> None:
        self.memory = PrefixMemory(max_blocks_per_replica)
        self.rng = rng or random.Random()

    def affinity(self, scores: Mapping[K, float], hashes: Sequence[int]) -> K | None:
        if not hashes:
            return None
        matches = {r: self.memory.match(r, hashes) for r in within_guard(scores)}
        longest = max(matches.values(), default=0)
        if longest == 0:
            return None
        return min((r for r, n in matches.items() if n == longest), key=lambda r: scores[r])

    def rank(self, scores: Mapping[K, float], hashes: Sequence[int]) -> list[K]:
        """Preferred replicas first: the affinity pick, then a pow2 pair of the others."""
        best = self.affinity(scores, hashes)
        if best is None:
            return pow2_rank(scores, self.rng)
        return [best, *pow2_rank({r: s for r, s in scores.items() if r != best}, self.rng)]

    def record(self, replica: Hashable, hashes: Sequence[int]) -> None:
        self.memory.record(replica, hashes)


class Inflight:
    """Requests this router picked a replica for and that have not completed, per replica.

    A pick counts at once, so a burst routed before the first request is sent still sees it;
    it is provisional until `sent` confirms where the request went, and a provisional entry
    expires (the request may be cancelled before it is sent, and then never completes).
    """

    def __init__(self, provisional_ttl_s: float = PROVISIONAL_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.provisional_ttl_s = provisional_ttl_s
        self.clock = clock
        self.entries: dict[str, tuple[Hashable, float | None]] = {}  # id -> (replica, expiry)

    def picked(self, request_id: str, replica: Hashable) -> None:
        self.entries[request_id] = (replica, self.clock() + self.provisional_ttl_s)

    def sent(self, request_id: str, replica: Hashable) -> None:
        self.entries[request_id] = (replica, None)

    def done(self, request_id: str, replica: Hashable) -> None:
        # A rejected attempt completes after its retry may have picked another replica.
        if self.entries.get(request_id, (None,))[0] == replica:
            del self.entries[request_id]

    def counts(self) -> Counter[Hashable]:
        now = self.clock()
        expired = [i for i, (_, exp) in self.entries.items() if exp is not None and exp < now]
        for request_id in expired:
            del self.entries[request_id]
        return Counter(replica for replica, _ in self.entries.values())

    def retain(self, replicas: Iterable[Hashable]) -> None:
        keep = set(replicas)
        self.entries = {i: e for i, e in self.entries.items() if e[0] in keep}


# Ray Serve routers. Serve tries the ranks in order and, within a rank, the replica with the
# shortest queue under max_ongoing_requests, so singleton ranks keep the policy's order while
# Serve still skips a full replica.


def request_tokens(pending_request: PendingRequest | None) -> list[int] | None:
    """The prompt of a `ReplicaRequest` call; None for a probe or any other call."""
    if pending_request is None or not pending_request.args:
        return None
    # Read by attribute: Serve hands the router a copy of the arguments whose class is not the
    # `ReplicaRequest` object of this module, so isinstance would refuse every request.
    tokens = getattr(pending_request.args[0], "prompt_token_ids", None)
    return tokens if isinstance(tokens, list) else None


def allow_backoff(pending_request: PendingRequest | None) -> None:
    # Without this flag Serve calls choose_replicas again at once when every replica is full.
    if pending_request is not None:
        pending_request.routing_context.should_backoff = True


def as_ranks(ranked: Sequence[ReplicaID], replicas: Sequence[RunningReplica]) -> list[list[RunningReplica]]:
    by_id = {r.replica_id: r for r in replicas}
    return [[by_id[replica_id]] for replica_id in ranked]


class LoadAwareRouter(RequestRouter):
    """Scores replicas from their reports and this router's in-flight count; ranks by `rank`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inflight = Inflight()
        self.rng = random.Random()

    def scores(self, replicas: Sequence[RunningReplica]) -> dict[ReplicaID, float]:
        own = self.inflight.counts()
        scores = {}
        for r in replicas:
            load = ReplicaLoad.from_stats(r.routing_stats)
            # Serve's queue-length cache: the replica's own count when it last answered (all
            # routers' requests), kept since by this router's sends and completions. While it
            # holds an entry (10 s) it is fresher than the report; past that, only this router's
            # own requests are known for sure.
            ongoing = self.replica_queue_len_cache.get(r.replica_id)
            if ongoing is not None:
                scores[r.replica_id] = load_score(load.recounted(max(ongoing, own[r.replica_id])))
            else:
                scores[r.replica_id] = load_score(load, own[r.replica_id])
        return scores

    def rank(self, scores: dict[ReplicaID, float],
             pending_request: PendingRequest | None) -> list[ReplicaID]:
        return pow2_rank(scores, self.rng)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        allow_backoff(pending_request)
        ranked = self.rank(self.scores(candidate_replicas), pending_request)
        if ranked and pending_request is not None:
            self.inflight.picked(pending_request.metadata.internal_request_id, ranked[0])
        return as_ranks(ranked, candidate_replicas)

    # Serve calls on_request_routed once a replica accepted the request (only under its
    # rejection protocol, the default outside Ray Client) and on_request_completed once per
    # attempt sent, rejected or not.
    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        self.inflight.sent(pending_request.metadata.internal_request_id, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.inflight.done(internal_request_id, replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.retain(self.curr_replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.retain(self.curr_replicas)

    def retain(self, replica_ids: Iterable[ReplicaID]) -> None:
        self.inflight.retain(replica_ids)


class Pow2Router(LoadAwareRouter):
    """Power of two choices on the engine's own load (queues, KV usage), not Serve's queue length."""


class PrefixRouter(LoadAwareRouter):
    """Prefix affinity within the load guard; pow2 otherwise.

    request_router_kwargs: `max_blocks_per_replica` (hashes remembered per replica, about its
    KV cache in blocks) and `block_size` (the engine's).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialize_state()

    def initialize_state(self, max_blocks_per_replica: int = MAX_BLOCKS_PER_REPLICA,
                         block_size: int = BLOCK_SIZE) -> None:
        self.policy = PrefixPolicy(max_blocks_per_replica, self.rng)
        self.block_size = block_size

    def prompt_hashes(self, pending_request: PendingRequest | None) -> list[int]:
        tokens = request_tokens(pending_request)
        return block_hashes(tokens, self.block_size) if tokens else []

    def rank(self, scores: dict[ReplicaID, float],
             pending_request: PendingRequest | None) -> list[ReplicaID]:
        hashes = self.prompt_hashes(pending_request)
        ranked = self.policy.rank(scores, hashes)
        if ranked and hashes:
            # Remember the pick now, so the rest of a burst follows it before any is sent.
            self.policy.record(ranked[0], hashes)
        return ranked

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        self.policy.record(replica_id, self.prompt_hashes(pending_request))

    def retain(self, replica_ids: Iterable[ReplicaID]) -> None:
        replica_ids = list(replica_ids)
        super().retain(replica_ids)
        self.policy.memory.retain(replica_ids)


class RoundRobinRouter(RequestRouter):
    """Rotates through the replicas; Serve moves on to the next when one is full."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A random start keeps the proxies' routers from all opening on the same replica.
        self.rotation = RoundRobin(start=random.randrange(1 << 30))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        allow_backoff(pending_request)
        return [[r] for r in self.rotation.rank(candidate_replicas)]


ROUTERS: dict[str, type[RequestRouter]] = {
    "prefix": PrefixRouter,
    "pow2": Pow2Router,
    "round-robin": RoundRobinRouter,
}
