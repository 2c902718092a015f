"""Batched sampling: one call per engine step turns logits [rows, vocab] into one token per row.

Order, as in vLLM: penalties -> min_tokens masking -> argmax for greedy rows; for the others
temperature -> top-k -> top-p -> min-p -> softmax -> draw.

Logprobs follow vLLM v1's default (`logprobs_mode="raw_logprobs"`): the log-softmax of the raw
model output, before penalties, temperature and truncation, so they score the model itself
whatever way a request chose to sample.

Random numbers: each sampled row draws exactly one uniform number per step, by inverse CDF. A row
with its own generator (a seeded request) takes it from that generator alone, so a seed gives the
same tokens whatever else shares the batch and whichever row it lands on; rows without one share
the sampler's generator. One number per row instead of the exponential race's one per vocab entry
is what makes sampling cheap on a CPU; the price is that a float32 CDF resolves probabilities only
to ~1e-7, which moves a sampled distribution by far less than anything measurable.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from llmscale.engine.sampling_params import SamplingParams
from llmscale.engine.transfer import to_device
from llmscale.kernels import cpu as cpu_kernels

# Mass within this of top_p counts as reaching it: float32 sums of probabilities are off by a few
# ulps, which would otherwise decide ties like probs [0.5, 0.3, 0.2] with top_p=0.8 at random.
TOP_P_TOLERANCE = 1e-6
# Top-k/top-p look at this many best tokens per row first (a partial top-k is ~10x cheaper than a
# full sort); only rows whose kept set may reach past them are tried wider, and finally sorted.
CANDIDATE_WIDTHS = (256, 4096)


@dataclass
class SamplingRow:
    """One row of the logits: one request this step."""

    params: SamplingParams
    output_token_ids: list[int]  # generated so far (penalties, min_tokens)
    prompt_token_ids: list[int]  # the repetition penalty covers prompt + output, like HF and vLLM
    generator: torch.Generator | None  # per request, set when params.seed is not None
    eos_token_ids: tuple[int, ...] = ()  # masked while len(output) < min_tokens


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None  # of the sampled token; None when params.logprobs is None
    top_logprobs: list[tuple[int, float]] | None  # top-N (token, logprob), best first


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor | None = None,
                            top_p: torch.Tensor | None = None,
                            min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Set to -inf, in place, every logit outside its row's kept set, and return `logits`.

    logits [R, V] float; top_k [R] int (<= 0 or >= V: off) keeps exactly the k largest (ties
    broken arbitrarily); top_p [R] (1: off) keeps the smallest set of best tokens whose
    probability (renormalised after top-k) sums to >= p; min_p [R] (0: off) keeps tokens whose
    probability is >= min_p * the largest one. The argmax is always kept.
    """
    num_rows, vocab = logits.shape
    k = torch.full((num_rows,), vocab, device=logits.device)
    if top_k is not None:
        k = torch.where(top_k <= 0, vocab, top_k.clamp(max=vocab))
    p = torch.ones(num_rows, device=logits.device) if top_p is None else top_p.float()
    pending = ((k < vocab) | (p < 1)).nonzero().squeeze(1)
    for width in (*CANDIDATE_WIDTHS, vocab):
        if len(pending) == 0:
            break
        sub = logits if len(pending) == num_rows else logits[pending]
        vals, idx, done = _truncate(sub, k[pending], p[pending], min(width, vocab))
        rows = pending[done]
        # All but the kept candidates go: fill the settled rows, then put the kept values back.
        if len(rows) == num_rows:
            logits.fill_(float("-inf"))
        else:
            logits.index_fill_(0, rows, float("-inf"))
        logits[rows[:, None], idx[done]] = vals[done]
        pending = pending[~done]
    if min_p is not None and bool((min_p > 0).any()):
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
        threshold = logits.amax(dim=-1, keepdim=True) + min_p.float().log()[:, None]
        logits.masked_fill_(logits < threshold, float("-inf"))
    return logits


def _truncate(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor, width: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k then top-p among each row's `width` best tokens. Returns their values (-inf where
    dropped) and indices [P, width], best first, and which rows [P] are settled: those whose kept
    set provably lies among the candidates."""
    vocab = logits.shape[1]
    if width < vocab:
        vals, idx = logits.topk(width, dim=-1)
    else:
        vals, idx = logits.sort(dim=-1, descending=True)
    vals.masked_fill_(torch.arange(width, device=logits.device) >= k[:, None], float("-inf"))
    done = k <= width
    if bool((p < 1).any()):
        # Top-p renormalises over the top-k set: known exactly where it lies among the
        # candidates, or where top-k is off (the whole row); any other row waits for a wider try.
        norm = vals.logsumexp(dim=-1)
        if not bool(done.all()):
            norm = torch.where(done, norm, logits.logsumexp(dim=-1))
        probs = (vals - norm[:, None]).exp_()
        mass = probs.cumsum(dim=-1)
        need = torch.where(p < 1, p - TOP_P_TOLERANCE, 2.0)[:, None]  # 2: top-p off
        drop = (mass - probs) >= need  # the better tokens already hold p of the mass
        drop[:, 0] = False
        vals.masked_fill_(drop, float("-inf"))
        done |= (k >= vocab) & (mass[:, -1] >= need[:, 0])
    return vals, idx, done


def _torch_argmax(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)


class Sampler:
    def __init__(self, seed: int | None = None, cpu_argmax: bool = False) -> None:
        """`cpu_argmax`: greedy rows take the C kernels' argmax, for fp32 logits on the CPU
        (torch's reduces a row at a time)."""
        self.seed = seed
        self._argmax = cpu_kernels.argmax if cpu_argmax else _torch_argmax
        self._generators: dict[torch.device, torch.Generator] = {}
        self._workspace: torch.Tensor | None = None

    def _default_generator(self, device: torch.device) -> torch.Generator:
        """The generator shared by rows without their own, one per device."""
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(self.seed)
            self._generators[device] = g
        return g

    def _scratch(self, num_rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        """A float32 [num_rows, vocab] buffer kept across steps: on a CPU, the page faults of a
        fresh 50 MB tensor each step cost more than the arithmetic done in it."""
        n = num_rows * vocab
        ws = self._workspace
        if ws is None or ws.numel() < n or ws.device != device:
            ws = self._workspace = torch.empty(n, dtype=torch.float32, device=device)
        return ws[:n].view(num_rows, vocab)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        assert logits.ndim == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        penalized = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0
                     or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
        # Rows short of min_tokens with a token to forbid: under ignore_eos and without stop
        # tokens there is none, and such rows keep the one-argmax path.
        min_tok = [i for i, r in enumerate(rows) if len(r.output_token_ids) < r.params.min_tokens
                   and _ending_tokens(r)]
        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]

        if all(greedy) and not penalized and not min_tok:
            # The common serving case: one argmax, exact in any float dtype.
            return self._results(logits, self._argmax(logits), rows, want_lp)

        # float32, contiguous and ours: everything below writes in place.
        x = self._scratch(*logits.shape, logits.device).copy_(logits)
        if penalized:
            apply_penalties(x, rows, penalized)
        if min_tok:
            _mask_stop_tokens(x, rows, min_tok)

        random_idx = [i for i, g in enumerate(greedy) if not g]
        if len(random_idx) == len(rows):
            token_ids = self._sample(x, rows)
        else:
            token_ids = self._argmax(x)
            if random_idx:
                ri = _index(random_idx, x.device)
                token_ids[ri] = self._sample(x[ri], [rows[i] for i in random_idx])
        return self._results(logits, token_ids, rows, want_lp)

    def _sample(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Draw one token per row of x (float32, contiguous, ours: overwritten)."""
        device = x.device
        params = [r.params for r in rows]
        x.div_(to_device([p.temperature for p in params], None, device)[:, None])
        top_k = top_p = min_p = None
        if any(0 < p.top_k < x.shape[1] for p in params):
            top_k = to_device([p.top_k for p in params], None, device)
        if any(p.top_p < 1 for p in params):
            top_p = to_device([p.top_p for p in params], None, device)
        if any(p.min_p > 0 for p in params):
            min_p = to_device([p.min_p for p in params], None, device)
        apply_top_k_top_p_min_p(x, top_k, top_p, min_p)
        # softmax works row by row, so a row's CDF does not depend on its neighbours.
        cdf = torch.softmax(x, dim=-1, out=x).cumsum_(dim=-1)  # [R, V]

        u = torch.empty(len(rows), device=device)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if len(shared) == len(rows):
            u.uniform_(generator=self._default_generator(device))
        else:
            if shared:
                u[_index(shared, device)] = torch.rand(len(shared), device=device,
                                                       generator=self._default_generator(device))
            for i, r in enumerate(rows):
                if r.generator is not None:
                    # A request's generator may live on the CPU while the logits sit on a GPU.
                    u[i] = torch.rand(1, generator=r.generator, device=r.generator.device).item()
        total = cdf[:, -1]
        # Strictly below the total, so the first CDF entry above it is a token with mass > 0.
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)

    def _results(self, logits: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow],
                 want_lp: list[int]) -> list[SampleResult]:
        results = [SampleResult(t, None, None) for t in token_ids.tolist()]
        if not want_lp:
            return results
        li = _index(want_lp, logits.device)
        # Raw model output, see the module doc. The scratch buffer is free again by now.
        raw = logits if len(want_lp) == len(rows) else logits[li]
        lp = torch.log_softmax(raw, dim=-1, dtype=torch.float32,
                               out=self._scratch(*raw.shape, raw.device))
        sampled = lp.gather(1, token_ids[li][:, None]).squeeze(1).tolist()
        max_n = max(rows[i].params.logprobs or 0 for i in want_lp)
        top_vals, top_ids = (t.tolist() for t in lp.topk(max_n, dim=-1))
        for j, i in enumerate(want_lp):
            n = rows[i].params.logprobs or 0
            results[i].logprob = sampled[j]
            results[i].top_logprobs = list(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
        return results


def _index(idx: list[int], device: torch.device) -> torch.Tensor:
    return to_device(idx, torch.long, device)


def _flat_keys(x: torch.Tensor, row_idx: list[int], token_lists: list[list[int]]) -> torch.Tensor:
    """Flat indices into x.view(-1) of (row, token) for every token of each row's list."""
    vocab = x.shape[1]
    lengths = to_device([len(t) for t in token_lists], None, x.device)
    tokens = to_device(list(itertools.chain.from_iterable(token_lists)), torch.long, x.device)
    row_ids = torch.repeat_interleave(_index(row_idx, x.device), lengths)
    ok = tokens < vocab  # a token the model cannot emit must not spill into the next row
    return (row_ids * vocab + tokens)[ok]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], idx: list[int] | None = None
                    ) -> torch.Tensor:
    """Repetition (HF style, on prompt + output), then frequency and presence (on output), in
    place on the rows of `logits` (contiguous float [R, V]) listed in `idx` (default: all) and
    returns it. Sparse: only the logits of tokens seen are touched."""
    idx = list(range(len(rows))) if idx is None else idx
    vocab = logits.shape[1]
    flat = logits.view(-1)
    rep = [i for i in idx if rows[i].params.repetition_penalty != 1.0]
    if rep:
        keys = _flat_keys(logits, rep, [rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep])
        factor = _per_row(rows, rep, "repetition_penalty", 1.0, logits.device)[keys // vocab]
        vals = flat[keys]
        # Duplicate keys all write the same value, so no unique() is needed here.
        flat[keys] = torch.where(vals > 0, vals / factor, vals * factor)
    additive = [i for i in idx if rows[i].params.presence_penalty or rows[i].params.frequency_penalty]
    if additive:
        keys, counts = _flat_keys(logits, additive, [rows[i].output_token_ids for i in additive]
                                  ).unique(return_counts=True)
        row_of = keys // vocab
        freq = _per_row(rows, additive, "frequency_penalty", 0.0, logits.device)[row_of]
        pres = _per_row(rows, additive, "presence_penalty", 0.0, logits.device)[row_of]
        flat[keys] -= freq * counts + pres
    return logits


def _per_row(rows: list[SamplingRow], idx: list[int], name: str, off: float,
             device: torch.device) -> torch.Tensor:
    """[R]: each listed row's sampling param `name`, `off` for the others."""
    out = torch.full((len(rows),), off, device=device)
    out[_index(idx, device)] = to_device([getattr(rows[i].params, name) for i in idx], None, device)
    return out


def _ending_tokens(row: SamplingRow) -> list[int]:
    """The tokens that would end this row's request: its stop tokens, and EOS unless it is
    ignored (as in vLLM: under ignore_eos EOS ends nothing)."""
    stops = list(row.params.stop_token_ids or ())
    return stops if row.params.ignore_eos else stops + list(row.eos_token_ids)


def _mask_stop_tokens(x: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
    """Forbid every token that would end a request still short of its min_tokens."""
    pairs = []
    for i in idx:
        pairs += [(i, t) for t in _ending_tokens(rows[i]) if t < x.shape[1]]
    if pairs:
        row_ids, tokens = zip(*pairs, strict=True)
        x[_index(list(row_ids), x.device), _index(list(tokens), x.device)] = float("-inf")
