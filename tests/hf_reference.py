"""Hugging Face transformers as the reference: greedy tokens and last-position logits."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch


def hf_model(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):  # noqa: ANN201
    return _load(folder, device, dtype)  # one cache entry however the defaults are spelled


@cache
def _load(folder: Path, device: str, dtype: torch.dtype):  # noqa: ANN202 - transformers type
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def hf_greedy(folder: Path, prompt_ids: list[int], num_tokens: int, device: str = "cpu") -> list[int]:
    """Greedy decoding with the KV cache, never stopping at EOS (like ignore_eos)."""
    model = hf_model(folder, device)
    out = model(torch.tensor([prompt_ids], device=device), use_cache=True)
    past = out.past_key_values
    tokens: list[int] = []
    for _ in range(num_tokens):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens


@torch.inference_mode()
def hf_last_logits(folder: Path, prompt_ids: list[int], device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = hf_model(folder, device, dtype)
    return model(torch.tensor([prompt_ids], device=device)).logits[0, -1].float()


@torch.inference_mode()
def hf_all_logits(folder: Path, prompt_ids: list[int]) -> torch.Tensor:
    """[len(prompt), vocab]: row i is the distribution of token i + 1."""
    return hf_model(folder)(torch.tensor([prompt_ids])).logits[0].float()


def assert_greedy_matches_hf(folder: Path, prompt_ids: list[int], got: list[int],
                             max_gap: float = 1e-4) -> None:
    """`got` equals transformers' greedy tokens, or parts from them where transformers' own top
    two logits lie within `max_gap`: fp32 sums in another order (chunked prefill, paged
    attention) may flip such a near-tie, while wrong K/V parts at a confident token."""
    from .divergence import first_divergence

    want = hf_greedy(folder, prompt_ids, len(got))
    i = first_divergence(got, want)
    if i is None:
        return
    top = hf_all_logits(folder, prompt_ids + want[:i])[-1].topk(2).values
    gap = float(top[0] - top[1])
    assert gap <= max_gap, f"parted from transformers at token {i}; its top two logits there: {gap:.3g} apart"
