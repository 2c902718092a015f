"""The hardware catalogue: what each device the capacity planner can use offers, in SI units.

The shipped catalogue is `hardware.yaml` next to this module; every number there carries its
source. A user file of the same schema (a top-level `hardware:` list) is read after it: an entry
whose name is already known replaces that entry, a new name adds one.

The YAML is written in the units vendors quote (GiB, GB/s, dense TFLOP/s, ms, us); `Hardware`
holds bytes, bytes/s, FLOP/s and seconds. Every problem is a one-line `ConfigError` naming the
file, the entry and the field.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmscale.config import ConfigError, parse_yaml, read_user_file

KINDS = ("gpu", "cpu")
DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8", "int4")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

# Field -> (scale to SI, lower bound, whether the bound itself is allowed).
_NUMBERS: dict[str, tuple[float, float, bool]] = {
    "memory_gib": (2.0**30, 0.0, False),
    "memory_bandwidth_gbs": (1e9, 0.0, False),
    "interconnect_gbs": (1e9, 0.0, True),  # 0: no device-to-device link (a CPU instance)
    "network_gbs": (1e9, 0.0, False),
    "cost_per_hour": (1.0, 0.0, False),
}
_EFFICIENCY = ("compute", "memory", "interconnect")
_OVERHEAD = {"step_ms": 1e-3, "per_seq_us": 1e-6}
_FIELDS = ("name", "kind", "description", *_NUMBERS, "peak_tflops", "devices_per_node", "efficiency",
           "overhead")


@dataclass(frozen=True)
class Hardware:
    name: str
    kind: str  # "gpu" | "cpu"
    description: str
    memory_bytes: float
    memory_bandwidth: float  # bytes/s
    peak_flops: dict[str, float]  # dtype -> dense FLOP/s (OP/s for int8/int4)
    interconnect_bandwidth: float  # bytes/s per direction between devices of a node (0: none)
    network_bandwidth: float  # bytes/s per device between nodes
    devices_per_node: int
    cost_per_hour: float  # USD per device-hour
    compute_efficiency: float
    memory_efficiency: float
    interconnect_efficiency: float
    step_overhead_s: float
    per_seq_overhead_s: float

    def supports(self, dtype: str) -> bool:
        """Whether the device computes in `dtype` natively (it has a peak for it)."""
        return self.peak_flops.get(dtype, 0.0) > 0.0


class _Entry:
    """Reads one YAML entry, turning every problem into a one-line ConfigError."""

    def __init__(self, source: str, index: int, raw: Any):
        self.source = source
        self.label = f"#{index + 1}"
        if not isinstance(raw, dict):
            self.fail(None, f"must be a mapping of fields, not {type(raw).__name__}")
        self.raw: dict[str, Any] = raw
        name = raw.get("name")
        if isinstance(name, str) and name:
            self.label = repr(name)

    def fail(self, field: str | None, problem: str) -> None:
        where = f"{self.source}: hardware entry {self.label}"
        if field is not None:
            where += f", field {field!r}"
        raise ConfigError(f"{where}: {problem}")

    def get(self, field: str, container: dict[str, Any] | None = None, path: str | None = None) -> Any:
        data = self.raw if container is None else container
        key = field if path is None else f"{path}.{field}"
        if field not in data or data[field] is None:
            self.fail(key, "missing")
        return data[field]

    def text(self, field: str) -> str:
        value = self.get(field)
        if not isinstance(value, str) or not value.strip():
            self.fail(field, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def number(self, value: Any, field: str, lower: float = 0.0, inclusive: bool = False,
               upper: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(field, f"must be a number, got {value!r}")
        x = float(value)
        if x != x or x in (float("inf"), float("-inf")):
            self.fail(field, f"must be finite, got {value!r}")
        if x < lower or (x == lower and not inclusive):
            bound = f">= {lower:g}" if inclusive else ("positive" if lower == 0 else f"> {lower:g}")
            self.fail(field, f"must be {bound}, got {value!r}")
        if upper is not None and x > upper:
            self.fail(field, f"must be <= {upper:g}, got {value!r}")
        return x

    def mapping(self, field: str, allowed: tuple[str, ...] | dict[str, float]) -> dict[str, Any]:
        value = self.get(field)
        if not isinstance(value, dict):
            self.fail(field, f"must be a mapping, got {value!r}")
        for key in value:
            if key not in allowed:
                self.fail(f"{field}.{key}", f"unknown; expected one of {', '.join(allowed)}")
        return value

    def build(self) -> Hardware:
        for key in self.raw:
            if key not in _FIELDS:
                self.fail(str(key), f"unknown field; expected {', '.join(_FIELDS)}")
        name = self.text("name")
        if not NAME_RE.match(name):
            self.fail("name", f"must be lowercase letters, digits, '.', '_' or '-' (it is typed on the "
                              f"command line), got {name!r}")
        kind = self.text("kind")
        if kind not in KINDS:
            self.fail("kind", f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        description = self.text("description")
        values = {f: self.number(self.get(f), f, lower, inclusive) * scale
                  for f, (scale, lower, inclusive) in _NUMBERS.items()}

        peaks_raw = self.mapping("peak_tflops", DTYPES)
        if not peaks_raw:
            self.fail("peak_tflops", "must list at least one dtype")
        peaks = {d: self.number(v, f"peak_tflops.{d}") * 1e12 for d, v in peaks_raw.items()}

        devices = self.get("devices_per_node")
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            self.fail("devices_per_node", f"must be a positive integer, got {devices!r}")

        eff = self.mapping("efficiency", _EFFICIENCY)
        effs = {k: self.number(self.get(k, eff, "efficiency"), f"efficiency.{k}", upper=1.0)
                for k in _EFFICIENCY}
        over = self.mapping("overhead", _OVERHEAD)
        overs = {k: self.number(self.get(k, over, "overhead"), f"overhead.{k}", inclusive=True) * scale
                 for k, scale in _OVERHEAD.items()}

        return Hardware(name=name, kind=kind, description=description,
                        memory_bytes=values["memory_gib"], memory_bandwidth=values["memory_bandwidth_gbs"],
                        peak_flops=peaks, interconnect_bandwidth=values["interconnect_gbs"],
                        network_bandwidth=values["network_gbs"], devices_per_node=devices,
                        cost_per_hour=values["cost_per_hour"], compute_efficiency=effs["compute"],
                        memory_efficiency=effs["memory"], interconnect_efficiency=effs["interconnect"],
                        step_overhead_s=overs["step_ms"], per_seq_overhead_s=overs["per_seq_us"])


def parse_catalogue(text: str, source: str) -> dict[str, Hardware]:
    """The entries of one catalogue file, in file order. `source` names it in errors."""
    data = parse_yaml(text, source)
    if not isinstance(data, dict) or "hardware" not in data:
        raise ConfigError(f"{source}: expected a top-level 'hardware:' list of entries")
    for key in data:
        if key != "hardware":
            raise ConfigError(f"{source}: unknown top-level key {key!r}; expected only 'hardware'")
    entries = data["hardware"]
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'hardware' must be a list of entries, got {type(entries).__name__}")
    out: dict[str, Hardware] = {}
    for i, raw in enumerate(entries):
        entry = _Entry(source, i, raw)
        hw = entry.build()
        if hw.name in out:
            entry.fail("name", f"duplicate name {hw.name!r} (entry #{list(out).index(hw.name) + 1} has it)")
        out[hw.name] = hw
    return out


def load_catalogue(extra: Path | None = None) -> dict[str, Hardware]:
    """The shipped catalogue, then the user's file (same schema): an entry with a known name
    replaces it, a new name adds one."""
    shipped = importlib.resources.files("llmscale.plan") / "hardware.yaml"
    catalogue = parse_catalogue(shipped.read_text(encoding="utf-8"), "llmscale/plan/hardware.yaml")
    if extra is not None:
        catalogue.update(parse_catalogue(read_user_file(extra, "hardware file"), str(extra)))
    return catalogue


def get_hardware(catalogue: dict[str, Hardware], names: str | None) -> list[Hardware]:
    """'h100-sxm,l4' -> those entries, in that order; None -> all. Unknown name -> ConfigError
    listing the known names."""
    if names is None:
        return list(catalogue.values())
    wanted: list[str] = []
    for part in names.split(","):
        name = part.strip().lower()
        if name and name not in wanted:
            wanted.append(name)
    if not wanted:
        raise ConfigError(f"no hardware named in {names!r}; known: {', '.join(catalogue)}")
    unknown = [n for n in wanted if n not in catalogue]
    if unknown:
        raise ConfigError(f"unknown hardware {', '.join(repr(n) for n in unknown)}; "
                          f"known: {', '.join(catalogue)}")
    return [catalogue[n] for n in wanted]
