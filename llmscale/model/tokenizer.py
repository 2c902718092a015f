"""Tokenizer, chat template and streaming detokenizer for an HF folder, without transformers.

`tokenizers` does the work from tokenizer.json; tokenizer_config.json adds what transformers
layers on top (named special tokens, cleanup of spaces, the chat template), reproduced here so
that token ids and rendered prompts match `transformers.AutoTokenizer` exactly.

BOS/EOS insertion is tokenizer.json's post-processor alone: with a tokenizer.json present,
transformers (5.x) drops `add_bos_token`/`add_eos_token` from tokenizer_config.json, so we do too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from llmscale.config import ConfigError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(value: Any) -> str | None:
    """A special token as configs spell it: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _clean_up_spaces(text: str) -> str:
    # transformers' `clean_up_tokenization`, applied only when a config asks for it.
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (marks assistant spans for training masks);
    for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes (<, >, &), which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _map_strings(value: Any, f: Callable[[str], str]) -> Any:
    """`value` with `f` applied to every string in it, through nested lists and dicts."""
    if isinstance(value, str):
        return f(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, f) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, f) for v in value]
    return value


def _unused_char(text: str) -> str:
    """A private-use character that `text` does not contain."""
    return next(c for c in map(chr, range(0xF0000, 0xFFFFE)) if c not in text)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # Templates ship with models, i.e. untrusted code: sandboxed, as transformers renders them.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the model's chat template does not parse: {e.message} (line {e.lineno})") \
            from None


class Tokenizer:
    """Text <-> token ids for one model, matching transformers' AutoTokenizer on the same folder."""

    def __init__(self, backend: BackendTokenizer, config: dict[str, Any],
                 chat_template: str | list[dict[str, str]] | None = None) -> None:
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = {
            k: t for k in SPECIAL_TOKEN_KEYS if (t := _content(config.get(k))) is not None}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extra_tokens = [t for v in (extra if isinstance(extra, list) else []) if (t := _content(v))]
        # transformers adds configured specials the tokenizer.json does not already match whole,
        # so they are never split into pieces and are dropped by skip_special_tokens.
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        decoder = config.get("added_tokens_decoder") or {}
        for entry in decoder.values() if isinstance(decoder, dict) else ():
            if isinstance(entry, dict) and entry.get("content") and entry["content"] not in known:
                special = bool(entry.get("special", False))
                token = AddedToken(entry["content"], single_word=entry.get("single_word", False),
                                   lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                                   normalized=entry.get("normalized", not special), special=special)
                (backend.add_special_tokens if special else backend.add_tokens)([token])
                known.add(entry["content"])
        missing = [t for t in [*self.special_tokens.values(), *extra_tokens] if t not in known]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                        for t in dict.fromkeys(missing)])
        # transformers skips this cleanup for BPE models (it deletes real spaces before punctuation)
        # unless a config insists; WordPiece-style vocabularies keep it.
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
        self.bos_token_id = self._id("bos_token")
        self.eos_token_id = self._id("eos_token")
        self.pad_token_id = self._id("pad_token")
        specials = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        specials |= {i for k in SPECIAL_TOKEN_KEYS if (i := self._id(k)) is not None}
        self.all_special_ids: list[int] = sorted(specials)

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"no tokenizer.json in {folder} (only fast-tokenizer folders are supported)")
        try:
            backend = BackendTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"cannot load {file}: {reason}") from None
        # special_tokens_map.json is the older home of the same keys; tokenizer_config.json wins.
        config = {**_read_json(folder / "special_tokens_map.json"),
                  **_read_json(folder / "tokenizer_config.json")}
        template = config.get("chat_template")
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():  # newer folders keep the template in its own file
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, config, template)

    def _id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (transformers' len(tokenizer))."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def _template_source(self, tools: list[dict[str, Any]] | None) -> str:
        template = self.chat_template
        if isinstance(template, list):  # named templates, as HF stores several
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = (named.get("tool_use") if tools else None) or named.get("default")
        if not template:
            raise ConfigError("this model has no chat template; send a plain prompt instead of messages")
        return str(template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """Render a conversation to the prompt text (tokenize it with add_special_tokens=False)."""
        template = _compile_template(self._template_source(tools))
        try:
            context = {"documents": None, **self.special_tokens, **kwargs}
            return template.render(messages=messages, tools=tools,
                                   add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            # raise_exception in a template rejects the conversation (e.g. roles not alternating).
            raise ConfigError(f"chat template rejected the messages: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> tuple[str, list[int]]:
        """Render a conversation and tokenize it: (prompt text, token ids).

        Only the template's own markers become special tokens. Special-token text inside the
        messages or tools (a user typing `<|im_end|>` to forge a system turn) stays text: it is
        swapped for a placeholder before rendering, so the render's special tokens are the
        template's alone. A conversation without such text takes the plain path, token for token
        what transformers gives.
        """
        mark = _unused_char(json.dumps([messages, tools], ensure_ascii=False, default=str)
                            + self._template_source(tools))
        hidden_messages, hidden_tools = self._hide_specials(messages, mark), self._hide_specials(tools, mark)
        text = self.apply_chat_template(hidden_messages, add_generation_prompt, hidden_tools, **kwargs)
        if (hidden_messages, hidden_tools) == (messages, tools):
            return text, self.encode(text, add_special_tokens=False)
        return self._encode_hidden(text, mark)

    def _hide_specials(self, value: Any, mark: str) -> Any:
        """`value` with each special token's text in its strings replaced by `mark`, the token's
        index in `_special_texts`, `mark`."""
        if not self._special_texts:
            return value
        index = {t: i for i, t in enumerate(self._special_texts)}

        def hide(m: re.Match[str]) -> str:
            return f"{mark}{index[m[0]]}{mark}"

        return _map_strings(value, lambda s: self._special_pattern.sub(hide, s))

    def _encode_hidden(self, text: str, mark: str) -> tuple[str, list[int]]:
        """A render with hidden special-token text: its special tokens, the template's, kept as
        they are; the text between them encoded with the hidden text put back and special-token
        matching off. Returns (the text as rendered with the real messages, token ids)."""
        placeholder = re.compile(f"{mark}(\\d+){mark}")

        def restore(part: str) -> str:
            return placeholder.sub(lambda m: self._special_texts[int(m[1])], part)

        ids: list[int] = []
        start = 0
        encoding = self.backend.encode(text, add_special_tokens=False)
        for token_id, (begin, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id in self._special_ids:
                ids += self._encode_as_text(restore(text[start:begin]))
                ids.append(token_id)
                start = end
        ids += self._encode_as_text(restore(text[start:]))
        return restore(text), ids

    @cached_property
    def _special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    @cached_property
    def _special_texts(self) -> list[str]:
        # Longest first, so that in `_special_pattern` a token wins over any token it starts with.
        texts = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        return sorted(texts, key=lambda t: (-len(t), t))

    @cached_property
    def _special_pattern(self) -> re.Pattern[str]:
        return re.compile("|".join(map(re.escape, self._special_texts)))

    @cached_property
    def _text_backend(self) -> BackendTokenizer:
        # A copy: the flag is tokenizer state, and the engine thread encodes with the original.
        backend = BackendTokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True  # special-token text is split like any other text
        return backend

    def _encode_as_text(self, text: str) -> list[int]:
        return self._text_backend.encode(text, add_special_tokens=False).ids if text else []


class IncrementalDetokenizer:
    """Streams a request's text one token at a time (vLLM's prefix/read offset scheme).

    Each step decodes a short window twice: ids[prefix:read] (text already emitted) and
    ids[prefix:] (with the new token); the difference is the new text. The window starts a
    few tokens back so the decoder sees word boundaries, and a result ending in U+FFFD (a
    character whose bytes are split across tokens) is held until the character completes.
    Call flush() when the request ends, so text held back (an emoji cut by max_tokens) is not
    lost; the deltas plus flush() then add up to decode(output ids).
    """

    # Prompt tokens kept as context; vLLM uses the same 5 (+2 for a split character).
    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-(self.CONTEXT + 2):]) if prompt_token_ids else []
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - self.CONTEXT, 0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self) -> None:
        # Ids before the new prefix are never decoded again: drop them to keep the window short.
        keep = self.read_offset
        self.ids = self.ids[keep:]
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def add(self, token_id: int) -> str:
        """Append one generated token; returns only the text it completes (often '')."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._advance()
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """At the end of a request: whatever is still held back (an unfinished character)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self._advance()
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
