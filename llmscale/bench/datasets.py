"""Workloads: what each request asks for. Prompts are text cut from the corpus shipped in the
package (so everything runs offline), a user's jsonl file, or long shared system prompts."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from llmscale.bench.lengths import LengthDist
from llmscale.config import ConfigError

log = logging.getLogger(__name__)
DATASETS = ("synthetic", "jsonl", "prefix-share")
HUMAN_ROLES = ("human", "user")
REPLY_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing")


@dataclass
class BenchRequest:
    prompt: str  # the user's text
    prompt_len: int  # tokens of prefix + prompt, as the workload's tokenizer counts them
    output_len: int  # max_tokens
    prefix: str = ""  # a system prompt shared with other requests (prefix-share)

    @property
    def text(self) -> str:
        """The whole prompt for a completions endpoint."""
        return self.prefix + self.prompt


class Codec:
    """Text <-> ids with a `tokenizers.Tokenizer`, without special tokens."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @classmethod
    def load(cls, path: str | Path) -> Codec:
        from tokenizers import Tokenizer

        file = Path(path)
        file = file / "tokenizer.json" if file.is_dir() else file
        if not file.is_file():
            raise ConfigError(f"no tokenizer at {file}: pass an HF model folder or a tokenizer.json")
        return cls(Tokenizer.from_file(str(file)))

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.backend.decode(ids))


@dataclass(frozen=True)
class WorkloadSpec:
    dataset: str = "synthetic"
    path: Path | None = None  # the jsonl file
    prompt_len: LengthDist = LengthDist("fixed", 256)
    output_len: LengthDist = LengthDist("fixed", 64)
    max_total_len: int = 2048  # prompt + output tokens per request; longer prompts are cut
    num_prefixes: int = 4  # prefix-share: distinct system prompts...
    prefix_len: int = 512  # ...of this many tokens each

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose {', '.join(DATASETS)}")
        if (self.dataset == "jsonl") != (self.path is not None):
            raise ConfigError("a FILE goes with --dataset jsonl, and only with it")
        if self.path is not None and not self.path.is_file():
            raise ConfigError(f"--dataset jsonl: no such file {self.path}")
        if self.max_total_len < 2 or self.num_prefixes < 1 or self.prefix_len < 1:
            raise ConfigError("--max-total-len must be >= 2, --num-prefixes and --prefix-len >= 1")
        if self.dataset == "prefix-share" and self.prefix_len >= self.max_total_len - 1:
            raise ConfigError(f"--prefix-len {self.prefix_len} leaves no room under --max-total-len "
                              f"{self.max_total_len}")


def corpus_ids(codec: Codec) -> list[int]:
    return codec.encode((files("llmscale") / "data" / "corpus.txt").read_text(encoding="utf-8"))


def make_requests(spec: WorkloadSpec, codec: Codec, n: int, seed: int) -> list[BenchRequest]:
    """`n` requests drawn from one generator seeded with `seed`: the same call gives the same
    workload, whatever server it is sent to."""
    spec.validate()
    rng = random.Random(seed)
    if spec.dataset == "jsonl":
        assert spec.path is not None
        return from_jsonl(spec.path, codec, n, spec, rng)
    ids = corpus_ids(codec)

    def cut(length: int) -> tuple[str, int]:
        length = min(length, len(ids) - 1)
        start = rng.randrange(len(ids) - length)
        return codec.decode(ids[start:start + length]), length

    prefixes = [cut(spec.prefix_len) for _ in range(spec.num_prefixes)] if spec.dataset == "prefix-share" \
        else [("", 0)]
    out = []
    for _ in range(n):
        prefix, prefix_len = prefixes[rng.randrange(len(prefixes))]
        output_len = min(spec.output_len.sample(rng), spec.max_total_len - prefix_len - 1)
        text, length = cut(min(spec.prompt_len.sample(rng), spec.max_total_len - prefix_len - output_len))
        sep = "\n\n" if prefix else ""
        out.append(BenchRequest(text, prefix_len + length, output_len, prefix + sep if prefix else ""))
    return out


def _record(line: str, where: str) -> tuple[str, int | str | None]:
    """A jsonl line -> (prompt, its output length or its reply's text or None). Two shapes:
    {"prompt": ..., "output_len": N} and a ShareGPT conversation
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("prompt"), str):
        n = obj.get("output_len", obj.get("max_tokens"))
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError(f"{where}: \"output_len\" must be an integer >= 1, got {n!r}")
        return obj["prompt"], n
    turns = obj.get("conversations")
    if isinstance(turns, list) and all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                       for t in turns):
        for i, t in enumerate(turns):
            if t.get("from") in HUMAN_ROLES:
                after = turns[i + 1:i + 2]
                reply = after[0]["value"] if after and after[0].get("from") in REPLY_ROLES else None
                return t["value"], reply
        raise ConfigError(f"{where}: the conversation has no human turn")
    raise ConfigError(f"{where}: expected {{\"prompt\": str, \"output_len\": int}} or a ShareGPT "
                      "{\"conversations\": [{\"from\": ..., \"value\": ...}]} record")


def from_jsonl(path: Path, codec: Codec, n: int, spec: WorkloadSpec,
               rng: random.Random) -> list[BenchRequest]:
    """Every line is checked up front (a bad line 90,000 should not surface mid-run); lines are
    then taken in a seeded random order, tokenized only as needed, and reused when there are
    fewer than `n`. A conversation's reply sets its output length; a bare prompt without
    `output_len` draws one from the output length distribution."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    records = [(i, _record(line, f"{path}:{i}")) for i, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise ConfigError(f"{path} holds no records")
    rng.shuffle(records)
    usable: list[BenchRequest] = []
    too_long = 0
    for _, (prompt, reply) in records:
        if len(usable) == n:
            break
        if reply is None:
            output_len = spec.output_len.sample(rng)
        else:
            output_len = reply if isinstance(reply, int) else max(1, len(codec.encode(reply)))
        prompt_len = len(codec.encode(prompt))
        if prompt_len == 0 or prompt_len + output_len > spec.max_total_len:
            too_long += 1
            continue
        usable.append(BenchRequest(prompt, prompt_len, output_len))
    if too_long:
        log.warning("%s: skipped %d records that are empty or longer than --max-total-len %d",
                    path, too_long, spec.max_total_len)
    if not usable:
        raise ConfigError(f"{path}: no record fits --max-total-len {spec.max_total_len}")
    return [usable[i % len(usable)] for i in range(n)]
