"""The capacity planner's hardware catalogue: the shipped file, user overrides, validation."""

from __future__ import annotations

import copy
import importlib.resources
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmscale.config import ConfigError
from llmscale.plan.hardware import Hardware, get_hardware, load_catalogue

REQUIRED_GPUS = ("h200", "h100-sxm", "a100-80gb", "l40s", "l4", "a10g")
NUMERIC_KEYS = ("memory_gib", "memory_bandwidth_gbs", "peak_tflops", "interconnect_gbs", "network_gbs",
                "devices_per_node", "cost_per_hour", "efficiency", "overhead")

VALID: dict[str, Any] = {
    "name": "test-gpu",
    "kind": "gpu",
    "description": "a made-up accelerator",
    "memory_gib": 16,
    "memory_bandwidth_gbs": 500,
    "peak_tflops": {"bf16": 100, "fp32": 10},
    "interconnect_gbs": 32,
    "network_gbs": 3.125,
    "devices_per_node": 4,
    "cost_per_hour": 1.5,
    "efficiency": {"compute": 0.6, "memory": 0.8, "interconnect": 0.7},
    "overhead": {"step_ms": 1.0, "per_seq_us": 10},
}


def write(tmp_path: Path, entries: list[Any], name: str = "hw.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"hardware": entries}, sort_keys=False))
    return path


def entry(**changes: Any) -> dict[str, Any]:
    """VALID with `changes` applied; `outer__inner` reaches into a nested mapping, None deletes."""
    e = copy.deepcopy(VALID)
    for key, value in changes.items():
        target, field = e, key
        if "__" in key:
            outer, field = key.split("__")
            target = e[outer]
        if value is None:
            del target[field]
        else:
            target[field] = value
    return e


def test_shipped_catalogue_loads_with_sane_entries() -> None:
    cat = load_catalogue()
    for name in REQUIRED_GPUS:
        assert cat[name].kind == "gpu"
    assert sum(1 for h in cat.values() if h.kind == "cpu") >= 3
    for h in cat.values():
        assert isinstance(h, Hardware)
        assert h.name == h.name.lower()
        assert h.memory_bytes > 0 and h.memory_bandwidth > 0 and h.network_bandwidth > 0, h.name
        assert h.peak_flops and all(v > 0 for v in h.peak_flops.values()), h.name
        assert h.supports("bf16") or h.supports("fp32"), h.name
        assert h.cost_per_hour > 0 and h.devices_per_node >= 1, h.name
        for eff in (h.compute_efficiency, h.memory_efficiency, h.interconnect_efficiency):
            assert 0 < eff <= 1, h.name
        assert h.step_overhead_s >= 0 and h.per_seq_overhead_s >= 0, h.name
        if h.kind == "gpu":
            assert h.interconnect_bandwidth > 0, h.name
        else:
            assert h.devices_per_node == 1 and h.interconnect_bandwidth == 0, h.name


def test_shipped_units_and_dtypes() -> None:
    cat = load_catalogue()
    h100 = cat["h100-sxm"]
    assert h100.peak_flops["bf16"] == pytest.approx(989e12)
    assert h100.peak_flops["fp8"] == pytest.approx(1979e12)
    assert h100.memory_bandwidth == pytest.approx(3.35e12)
    assert h100.interconnect_bandwidth == pytest.approx(450e9)
    assert h100.memory_bytes == pytest.approx(79.6 * 2**30)
    assert h100.step_overhead_s == pytest.approx(1e-3) and h100.per_seq_overhead_s == pytest.approx(10e-6)
    assert h100.supports("fp8") and not cat["a100-80gb"].supports("fp8")
    assert not cat["c6a.16xlarge"].supports("bf16") and cat["c7i.8xlarge"].supports("bf16")
    # Faster parts are faster: a sanity check against unit slips in the file.
    assert cat["h200"].memory_bandwidth > h100.memory_bandwidth > cat["a100-80gb"].memory_bandwidth
    assert h100.peak_flops["bf16"] > cat["l40s"].peak_flops["bf16"] > cat["l4"].peak_flops["bf16"]


def test_every_shipped_number_names_its_source() -> None:
    text = (importlib.resources.files("llmscale.plan") / "hardware.yaml").read_text()
    key_re = re.compile(rf"^\s*({'|'.join(NUMERIC_KEYS)}):")
    lines = [line for line in text.splitlines() if key_re.match(line)]
    assert len(lines) >= 9 * len(REQUIRED_GPUS)
    missing = [line.strip() for line in lines if "# source:" not in line]
    assert not missing, missing


def test_user_file_overrides_and_adds(tmp_path: Path) -> None:
    shipped = load_catalogue()
    cheaper = entry(name="h100-sxm", description="H100 at our negotiated price", cost_per_hour=2.0,
                    memory_gib=80, memory_bandwidth_gbs=3350, peak_tflops={"bf16": 989, "fp8": 1979},
                    interconnect_gbs=450, network_gbs=50, devices_per_node=8)
    path = write(tmp_path, [cheaper, entry(name="my-gpu")])
    cat = load_catalogue(path)
    assert len(cat) == len(shipped) + 1
    assert cat["h100-sxm"].cost_per_hour == 2.0
    assert cat["h100-sxm"].description == "H100 at our negotiated price"
    assert cat["my-gpu"].peak_flops == {"bf16": 100e12, "fp32": 10e12}
    assert cat["my-gpu"].memory_bytes == 16 * 2**30
    assert list(cat)[: len(shipped)] == list(shipped)  # a replaced entry keeps its place
    assert cat["l4"] == shipped["l4"]


def test_empty_user_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("hardware: []\n")
    assert load_catalogue(path) == load_catalogue()


@pytest.mark.parametrize("changes, field, words", [
    (dict(memory_bandwidth_gbs=None), "memory_bandwidth_gbs", "missing"),
    (dict(efficiency__memory=None), "efficiency.memory", "missing"),
    (dict(memory_gib="lots"), "memory_gib", "must be a number"),
    (dict(cost_per_hour=True), "cost_per_hour", "must be a number"),
    (dict(peak_tflops=[100]), "peak_tflops", "must be a mapping"),
    (dict(memory_bandwidth_gbs=0), "memory_bandwidth_gbs", "positive"),
    (dict(memory_gib=-8), "memory_gib", "positive"),
    (dict(interconnect_gbs=-1), "interconnect_gbs", ">= 0"),
    (dict(peak_tflops={"bf16": 0}), "peak_tflops.bf16", "positive"),
    (dict(peak_tflops={}), "peak_tflops", "at least one dtype"),
    (dict(peak_tflops={"bf17": 5}), "peak_tflops.bf17", "unknown"),
    (dict(devices_per_node=2.5), "devices_per_node", "positive integer"),
    (dict(devices_per_node=0), "devices_per_node", "positive integer"),
    (dict(kind="tpu"), "kind", "unknown kind 'tpu'"),
    (dict(efficiency__compute=0), "efficiency.compute", "positive"),
    (dict(efficiency__compute=1.5), "efficiency.compute", "<= 1"),
    (dict(overhead__step_ms=-1), "overhead.step_ms", ">= 0"),
    (dict(colour="green"), "colour", "unknown field"),
])
def test_validation_errors_name_file_entry_and_field(tmp_path: Path, changes: dict[str, Any], field: str,
                                                     words: str) -> None:
    path = write(tmp_path, [entry(name="ok-gpu"), entry(name="bad-gpu", **changes)])
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg and "'bad-gpu'" in msg and f"field {field!r}" in msg and words in msg, msg


def test_duplicate_name_within_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, [entry(name="twin"), entry(name="other"), entry(name="twin", cost_per_hour=9)])
    with pytest.raises(ConfigError, match=r"entry 'twin', field 'name': duplicate name 'twin' \(entry #1"):
        load_catalogue(path)


@pytest.mark.parametrize("name", ["H100", "my gpu", "a,b", ""])
def test_names_must_be_usable_on_the_command_line(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, [entry(name=name)])
    with pytest.raises(ConfigError, match=r"field 'name'"):
        load_catalogue(path)


@pytest.mark.parametrize("text, words", [
    ("hardware: {h100: 1}\n", "'hardware' must be a list"),
    ("gpus: []\n", "top-level 'hardware:'"),
    ("hardware: []\nextra: 1\n", "unknown top-level key 'extra'"),
    ("hardware: [1, 2\n", "not valid YAML"),
    ("hardware:\n  - just-a-string\n", "entry #1: must be a mapping"),
])
def test_malformed_files(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    assert words in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_user_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_catalogue(tmp_path / "nope.yaml")


def test_get_hardware_selects_in_order() -> None:
    cat = load_catalogue()
    assert [h.name for h in get_hardware(cat, "l4,h100-sxm")] == ["l4", "h100-sxm"]
    assert [h.name for h in get_hardware(cat, " H100-SXM , l4,l4 ")] == ["h100-sxm", "l4"]
    assert get_hardware(cat, None) == list(cat.values())


def test_get_hardware_unknown_lists_known() -> None:
    cat = load_catalogue()
    with pytest.raises(ConfigError) as info:
        get_hardware(cat, "h100-sxm,b200")
    msg = str(info.value)
    assert "'b200'" in msg and all(name in msg for name in cat) and "\n" not in msg
    with pytest.raises(ConfigError, match="known: h200"):
        get_hardware(cat, " , ")
