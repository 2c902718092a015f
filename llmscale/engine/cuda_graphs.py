"""Decode-only steps on a GPU replayed as CUDA graphs.

A decode step of a small model is a few hundred tiny kernels, and launching them from Python
costs far more than running them: a step of SmolLM2-135M spends tens of ms in launches on a GPU
that computes it in about one. As in vLLM, such steps are captured once and replayed with one
launch.

A graph has fixed shapes and addresses, so decodes are padded up to a bucket: the batch to a
power of two (at most `max_num_seqs`), the block-table width to a power of two blocks (at most
a `max_model_len` request's). Inputs live in static buffers that each step copies into. Padded
rows decode token 0 at position 0, write their K/V into a scratch block that no request owns
(the cache has one block more than the pool hands out) and attend to that one slot; their
outputs are dropped. Graphs are captured on first use, into one shared memory pool: they never
run at once, so their temporaries may share memory.

With `capture=False` the same padded buffers run eagerly, so the padding is tested where no GPU is.
"""

from __future__ import annotations

import torch

from llmscale.model.attention import AttentionMetadata
from llmscale.model.llama import LlamaForCausalLM


def bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most `cap` (n <= cap)."""
    return min(1 << max(0, n - 1).bit_length(), cap)


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, block_size: int, max_num_seqs: int, max_blocks: int,
                 scratch_block: int, device: torch.device, mask_dtype: torch.dtype, capture: bool) -> None:
        self.model = model
        self.block_size = block_size
        self.max_batch = max_num_seqs
        self.max_blocks = max_blocks
        self.capture = capture
        self.mask_dtype = mask_dtype
        self.scratch_slot = scratch_block * block_size
        self.input_ids = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.slots = torch.full((max_num_seqs,), self.scratch_slot, dtype=torch.long, device=device)
        # Per (batch, width) bucket: its block tables and mask buffers, and its graph and output.
        self.inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def _buffers(self, batch: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (batch, width)
        if key not in self.inputs:
            device = self.input_ids.device
            tables = torch.zeros(batch, width, dtype=torch.long, device=device)
            mask = torch.full((batch, 1, 1, width * self.block_size), float("-inf"), dtype=self.mask_dtype,
                              device=device)
            self.inputs[key] = (tables, mask)
        return self.inputs[key]

    def _forward(self, batch: int, tables: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Fresh slices and workspaces on every call: the rotary tables are looked up once per
        # positions tensor, so a capture must see a tensor the warm-up did not, or it would not
        # record the lookup.
        meta = AttentionMetadata(slot_mapping=self.slots[:batch], num_decode_tokens=batch,
                                 decode_block_tables=tables, decode_mask=mask, workspaces={})
        return self.model(self.input_ids[:batch], self.positions[:batch], meta)

    def _capture(self, batch: int, tables: torch.Tensor, mask: torch.Tensor) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy init, cuBLAS handles
            self._forward(batch, tables, mask)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._forward(batch, tables, mask)
        self.graphs[(batch, tables.shape[1])] = (graph, out)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, decode_mask: torch.Tensor) -> torch.Tensor:
        """One decode step of `n` requests (the runner's tensors: block tables [n, w], mask
        [n, 1, 1, w * block_size]); returns hidden states [n, hidden]."""
        n, w = block_tables.shape
        batch, width = bucket(n, self.max_batch), bucket(w, self.max_blocks)
        tables, mask = self._buffers(batch, width)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        tables[:n, :w].copy_(block_tables)
        mask[:n, ..., :w * self.block_size].copy_(decode_mask)
        mask[:n, ..., w * self.block_size:].fill_(float("-inf"))
        if n < batch:  # padding rows: token 0 at position 0, into and out of the scratch slot
            self.input_ids[n:batch].zero_()
            self.positions[n:batch].zero_()
            self.slots[n:batch].fill_(self.scratch_slot)
            tables[n:batch].fill_(self.scratch_slot // self.block_size)
            mask[n:batch].fill_(float("-inf"))
            mask[n:batch, ..., 0] = 0.0
        if not self.capture:
            return self._forward(batch, tables, mask)[:n]
        if (batch, width) not in self.graphs:
            self._capture(batch, tables, mask)
        graph, out = self.graphs[(batch, width)]
        graph.replay()
        return out[:n]
