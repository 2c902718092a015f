"""Shared fixtures: the default model converted once per session, and tiny random HF models."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(autouse=True)
def cpu_unless_a_cuda_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines default to the GPU where there is one; outside test_cuda.py the tests are about
    the CPU path (its C kernels, its fallbacks), so there they see no GPU."""
    if torch.cuda.is_available() and request.node.path.name != "test_cuda.py":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def smollm_folder() -> Path:
    """The built-in SmolLM2-135M-Instruct as an HF folder (converted from its GGUF once)."""
    from llmscale.model.lookup import resolve_model

    return resolve_model(None)


TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False),
    "llama3-rope": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1, rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
                    sliding_window=None),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True),
}
# Its window is far below its context (max_position_embeddings 1024), so the engine caps to it.
TINY_CONFIGS["mistral-window"] = {**TINY_CONFIGS["mistral"], "sliding_window": 32}


@pytest.fixture(scope="session")
def tokenizer_folder(request: pytest.FixtureRequest) -> Path:
    """A folder holding SmolLM2's tokenizer files: the default model's, or `LLMSCALE_TEST_TOKENIZER`
    where the default model is not installed (a GPU machine given only the test suite)."""
    given = os.environ.get("LLMSCALE_TEST_TOKENIZER")
    return Path(given) if given else request.getfixturevalue("smollm_folder")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_folder: Path) -> Callable[[str], Path]:
    """Builds (once per kind) a tiny random model with transformers, saved as a real HF folder
    with SmolLM2's tokenizer so prompts are real text."""
    import transformers

    built: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind in built:
            return built[kind]
        spec = dict(TINY_CONFIGS[kind])
        model_type = spec.pop("model_type")
        config = transformers.AutoConfig.for_model(
            model_type, vocab_size=49152, max_position_embeddings=1024, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, initializer_range=0.2, **spec)
        torch.manual_seed(1234)
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        _randomize_qk_norms(model)
        folder = tmp_path_factory.mktemp(f"tiny-{kind}")
        model.save_pretrained(folder, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (tokenizer_folder / name).exists():
                shutil.copy(tokenizer_folder / name, folder / name)
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == spec["architectures"]
        built[kind] = folder
        return folder

    return make


@torch.no_grad()
def _randomize_qk_norms(model: torch.nn.Module) -> None:
    """transformers starts norm weights at ones, under which a QK-norm commutes with rotary and
    q's weight is k's: random ones make parity tests see where and which norm is applied."""
    for name, param in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            param.uniform_(0.5, 1.5)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Water boils at 100 degrees Celsius. The chemical formula of water is",
]


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)


@pytest.fixture(scope="session")
def llmscale_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Points LLMSCALE_CACHE at one temp folder for the session, so GGUF conversions under test
    never touch (or reuse) the user's ~/.cache/llmscale."""
    path = tmp_path_factory.mktemp("llmscale-cache")
    old = os.environ.get("LLMSCALE_CACHE")
    os.environ["LLMSCALE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LLMSCALE_CACHE", None)
    else:
        os.environ["LLMSCALE_CACHE"] = old
