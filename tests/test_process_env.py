"""llmscale's own process settings: torch's large CPU allocations on transparent huge pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A fresh interpreter imports llmscale, then torch allocates a 64 MiB tensor (as a KV cache
# would); it reports the huge pages of the mapping that holds the tensor and its environment.
PROBE = """
import json, os, sys
import llmscale, torch
from llmscale.process_env import peer_environ
x = torch.ones(16 << 20)
addr, huge, inside = x.data_ptr(), 0, False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
        lo, hi = (int(v, 16) for v in head.split("-"))
        inside = lo <= addr < hi
    elif inside and head == "AnonHugePages:":
        huge = int(line.split()[1])
print(json.dumps({"huge_kb": huge, "env": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                  "peer": peer_environ().get("THP_MEM_ALLOC_ENABLE")}))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not THP_ENABLED.exists() or "[never]" in THP_ENABLED.read_text(),
                    reason="this kernel gives no transparent huge pages")
def test_large_tensors_sit_on_huge_pages_once_llmscale_is_imported() -> None:
    got = probe()
    assert got["env"] == "1"
    assert got["huge_kb"] >= 2048, got  # at least one 2 MiB page under the 64 MiB tensor
    assert got["peer"] is None  # a peer started from here runs with its own defaults


def test_a_value_the_user_set_stands_and_reaches_peers() -> None:
    got = probe(THP_MEM_ALLOC_ENABLE="0")
    assert got["env"] == "0" and got["peer"] == "0"
