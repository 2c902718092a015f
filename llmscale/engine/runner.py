"""Turns a `ScheduledBatch` into one flat batch of tensors and runs the model once."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llmscale.config import ModelConfig
from llmscale.engine import fused_decode
from llmscale.engine.cuda_graphs import DecodeGraphs
from llmscale.engine.host_memory import keep_freed_memory
from llmscale.engine.kv_cache import KVCacheManager
from llmscale.engine.request import Request
from llmscale.engine.scheduler import ScheduledBatch
from llmscale.engine.transfer import to_device
from llmscale.kernels import cpu as cpu_kernels
from llmscale.model.attention import AttentionMetadata, PrefillChunk
from llmscale.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from llmscale.parallel.context import ContextParallel, SplitChunk

log = logging.getLogger(__name__)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1,
                       num_layers: int | None = None) -> int:
    """Bytes of one KV block on a rank of `tp_size` holding `num_layers` layers (default all)."""
    kv_heads = max(1, cfg.num_key_value_heads // tp_size)
    elem = torch.empty(0, dtype=dtype).element_size()
    layers = cfg.num_hidden_layers if num_layers is None else num_layers
    return 2 * layers * block_size * kv_heads * cfg.head_dim * elem


@dataclass
class StepResult:
    # Logits [N, vocab] for the N requests that reach the end of their known tokens this step
    # (they get a new token), and those requests in row order.
    logits: torch.Tensor | None = None
    sampled: list[Request] = field(default_factory=list)
    # For requests that asked for prompt logprobs: (request, first position, logits [n, vocab])
    # where row i predicts prompt token first position + i + 1.
    prompt_logits: list[tuple[Request, int, torch.Tensor]] = field(default_factory=list)


@dataclass
class StepInputs:
    """One step's flat batch, as tensors, and which of its rows want logits."""

    input_ids: torch.Tensor  # [T]: the decodes' tokens, then each prefill chunk's
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: list[int]  # rows whose logits sample a token, for `sampled` in order
    sampled: list[Request]
    prompt_rows: list[tuple[Request, int, int, int]]  # (request, first position, row, count)
    splits: list[SplitChunk]  # chunks split over context-parallel ranks
    num_rows: int  # of the whole batch: more than this rank's when it runs parts of split chunks

    @property
    def has_prefills(self) -> bool:
        return bool(self.meta.prefills)

    @property
    def num_logit_rows(self) -> int:
        return len(self.sample_rows) + sum(count for *_, count in self.prompt_rows)

    def split_logits(self, logits: torch.Tensor) -> StepResult:
        """A `StepResult` from the logits of every wanted row, stacked in `flat_logits`' order."""
        n = len(self.sample_rows)
        result = StepResult(logits=logits[:n] if n else None, sampled=self.sampled)
        for r, start, _, count in self.prompt_rows:
            result.prompt_logits.append((r, start, logits[n:n + count]))
            n += count
        return result


def flat_logits(result: StepResult) -> torch.Tensor | None:
    """Every row of a step's logits in one tensor (sampled rows, then prompt-logprob rows), for a
    pipeline's last stage to send; None when it has none."""
    parts = [result.logits] if result.logits is not None else []
    parts += [logits for *_, logits in result.prompt_logits]
    return torch.cat(parts) if parts else None


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, block_size: int, num_blocks: int,
                 kv_dtype: torch.dtype, device: torch.device, cpu_cores: list[int] | None = None,
                 context: ContextParallel | None = None) -> None:
        """`cpu_cores`: pin the step loop's OpenMP threads to these cores, one each; `context`:
        this rank's place among context-parallel ranks, which split long prefill chunks."""
        self.model = model
        self.context = context
        self.cpu_cores = cpu_cores
        self._pinned_thread: int | None = None
        self.block_size = block_size
        self.device = device
        self.kv_dtype = kv_dtype
        self.workspaces: dict[str, torch.Tensor] = {}
        if device.type == "cpu":
            keep_freed_memory()
        # Attention runs llmscale's C kernels where they apply (see AttentionMetadata): decodes
        # read an fp32 or bf16 cache in place (their kernel reads blocks 4 rows at a time), and
        # rotary, the cache write and prefill attention run in C too, in fp32 whatever the
        # activations: torch's bf16 SDPA took 42% of a bf16 prefill step (BENCHMARKS.md).
        head_dim = model.layers[0].self_attn.head_dim
        self.decode_in_place = (device.type == "cpu" and kv_dtype in (torch.float32, torch.bfloat16)
                                and head_dim % 16 == 0 and block_size % 4 == 0 and cpu_kernels.available())
        self.c_kernels = self.decode_in_place
        # bf16 activations on a CPU with AVX-512 BF16: prefill attention multiplies bf16 values two
        # products a lane, as torch's bf16 attention rounds them, in about two thirds of the time
        # of fp32 products (BENCHMARKS.md, "Prefill off oneDNN").
        self.attention_bf16_dots = (self.c_kernels and model.activation_dtype == torch.bfloat16
                                    and head_dim % 32 == 0 and cpu_kernels.pair_panels_available())
        # One block more than the pool hands out: a scratch block for padded rows (see cuda_graphs).
        self.scratch_block = num_blocks
        for layer in model.layers:
            attn = layer.self_attn
            shape = (num_blocks + 1, block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=kv_dtype, device=device)
            attn.v_cache = torch.zeros(shape, dtype=kv_dtype, device=device)
        # Decode-only steps run every layer in one C call where the model allows it (not with
        # tensor parallelism, whose layers all-reduce between them, nor on a pipeline stage,
        # which holds only some of them); with the layers' weights still
        # streaming in, once a forward has seen them all (`_fused_later`).
        self.fused = None
        fusable = self.decode_in_place and model.tp_size == 1 and model.is_first_stage and model.is_last_stage
        self._fused_later = fusable and model.pending_layers is not None
        if fusable and not self._fused_later:
            self.fused = fused_decode.FusedDecoder.build(model, block_size)
        self.graphs: DecodeGraphs | None = None

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        """Run decode-only steps through `DecodeGraphs` (CUDA graphs; `capture=False`: the same
        padded buffers run eagerly)."""
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.block_size, max_num_seqs, max_blocks, self.scratch_block,
                                   self.device, self.kv_dtype, capture)

    def _decode_mask(self, context: torch.Tensor, width: int) -> torch.Tensor:
        """[B, 1, 1, width]: 0 where a decode may attend, -inf past its context."""
        valid = torch.arange(width, device=self.device)[None, :] < context[:, None]
        # An additive float mask takes SDPA's fast CPU path; a bool mask does not.
        mask = torch.zeros(valid.shape, dtype=self.kv_dtype, device=self.device)
        return mask.masked_fill_(~valid, float("-inf")).view(len(context), 1, 1, width)

    def _tensor(self, data: list[int]) -> torch.Tensor:
        return to_device(data, torch.long, self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, kv: KVCacheManager) -> StepResult | None:
        """Run one step of the model over every scheduled token (None on a context-parallel
        rank but the first, which samples)."""
        inputs = self.prepare(batch, kv)
        hidden = self.run_model(inputs)
        if self.context is not None:
            hidden = self.context.gather_hidden(hidden, inputs.splits, inputs.num_rows)
            if hidden is None:
                return None
        return self.logits(inputs, hidden)

    def prepare(self, batch: ScheduledBatch, kv: KVCacheManager) -> StepInputs:
        """The step's flat batch as tensors, and which rows' logits it wants."""
        if self.cpu_cores and self._pinned_thread != threading.get_ident():
            # An OpenMP team belongs to the thread that starts it: pin the one running steps.
            if not cpu_kernels.bind_threads(self.cpu_cores):
                log.warning("could not pin threads to cores %s", self.cpu_cores)
            self._pinned_thread = threading.get_ident()
        bs = self.block_size
        decodes = [(r, n) for r, n in batch.scheduled if n == 1]
        prefills = [(r, n) for r, n in batch.scheduled if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Request] = []

        tables = [kv.block_ids(r.request_id) for r, _ in decodes]
        for (r, _), table in zip(decodes, tables, strict=True):
            pos = r.num_computed_tokens
            input_ids.append(r.all_token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if pos + 1 == r.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sampled.append(r)
        meta_slots = [self._tensor(slots)] if slots else []
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode_tokens=len(decodes),
                                 workspaces=self.workspaces, c_kernels=self.c_kernels,
                                 attention_bf16_dots=self.attention_bf16_dots,
                                 decode_in_place=self.decode_in_place)
        if decodes:
            width = max(len(t) for t in tables)
            meta.decode_block_tables = self._tensor([t + [0] * (width - len(t)) for t in tables])
            context = self._tensor([r.num_computed_tokens + 1 for r, _ in decodes])
            if self.decode_in_place:
                meta.decode_context_lens = context
            else:
                meta.decode_mask = self._decode_mask(context, width * bs)

        id_parts = [self._tensor(input_ids)] if input_ids else []
        pos_parts = [self._tensor(positions)] if positions else []
        # Rows of the whole batch (what logits are indexed by), and of this rank's part of it:
        # the same unless a context-parallel rank runs only its part of a long chunk.
        offset = local = len(input_ids)
        prompt_rows: list[tuple[Request, int, int, int]] = []
        splits: list[SplitChunk] = []
        for r, n in prefills:
            start = r.num_computed_tokens
            table = self._tensor(kv.block_ids(r.request_id))
            pos = torch.arange(start, start + n, device=self.device)
            ids = self._tensor(r.all_token_ids[start:start + n])
            slot = table[pos // bs] * bs + pos % bs
            context_len = start + n
            if r.prompt_logprobs is not None:
                # Positions whose next token is still a prompt token.
                count = min(context_len, r.num_prompt_tokens - 1) - start
                if count > 0:
                    prompt_rows.append((r, start, offset, count))
            table = table[: -(-context_len // bs)]
            split = self.context.split(n, slot, start, offset, local) if self.context is not None else None
            if split is None:
                meta.prefills.append(PrefillChunk(local, n, context_len, table))
                id_parts.append(ids)
                pos_parts.append(pos)
                meta_slots.append(slot)
                local += n
            else:  # this rank's part of the chunk (positions in it)
                part, ring, where = split
                meta.prefills.append(PrefillChunk(local, len(part), context_len, table, ring))
                splits.append(where)
                id_parts.append(ids[part])
                pos_parts.append(pos[part])
                meta_slots.append(slot[part])
                local += len(part)
            offset += n
            if context_len == r.num_tokens:
                sample_rows.append(offset - 1)
                sampled.append(r)

        meta.slot_mapping = torch.cat(meta_slots)
        return StepInputs(torch.cat(id_parts), torch.cat(pos_parts), meta, sample_rows, sampled, prompt_rows,
                          splits, offset)

    def run_model(self, inputs: StepInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's layers over the batch: from the token ids, or from the previous pipeline
        stage's `hidden`."""
        meta, decodes = inputs.meta, inputs.meta.num_decode_tokens
        if self._fused_later and self.model.pending_layers is None:  # a forward has seen every layer
            self.fused = fused_decode.FusedDecoder.build(self.model, self.block_size)
            self._fused_later = False
        if self.fused is not None and not inputs.has_prefills and decodes <= self.fused.max_rows:
            return self.fused(inputs.input_ids, inputs.positions, meta.slot_mapping, meta.decode_block_tables,
                              meta.decode_context_lens)
        if (self.graphs is not None and not inputs.has_prefills and decodes <= self.graphs.max_batch
                and meta.decode_mask is not None):
            return self.graphs(inputs.input_ids, inputs.positions, meta.slot_mapping,
                               meta.decode_block_tables, meta.decode_mask)
        return self.model(inputs.input_ids, inputs.positions, meta, hidden)

    def logits(self, inputs: StepInputs, hidden: torch.Tensor) -> StepResult:
        """The logits of the rows the step samples and of its prompt-logprob rows (the last
        pipeline stage's work)."""
        result = StepResult(sampled=inputs.sampled)
        if inputs.sample_rows:
            result.logits = self.model.compute_logits(hidden[self._tensor(inputs.sample_rows)])
        result.prompt_logits = [(r, start, self.model.compute_logits(hidden[row:row + count]))
                                for r, start, row, count in inputs.prompt_rows]
        return result
