"""Step metadata from Python lists to the device."""

from __future__ import annotations

from typing import Any

import torch


def to_device(data: list[Any], dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """`torch.tensor(data)` on `device`. To a GPU it goes through pinned memory, asynchronously: a
    copy from pageable memory first waits for all work queued on the stream, so the host could
    not prepare the rest of a step while the GPU runs."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype).pin_memory().to(device, non_blocking=True)
