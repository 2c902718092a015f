"""One streamed request to an OpenAI-compatible server, timed chunk by chunk."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from llmscale.bench.datasets import BenchRequest
from llmscale.bench.metrics import RequestResult
from llmscale.config import ConfigError

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class Target:
    base_url: str  # scheme://host:port, without /v1
    model: str
    endpoint: str = "completions"  # completions | chat
    api_key: str | None = None
    ignore_eos: bool = True
    extra_headers: tuple[tuple[str, str], ...] = ()  # sent with every request (--header)

    @property
    def headers(self) -> dict[str, str]:
        auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {**dict(self.extra_headers), **auth}

    def body(self, req: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            # ignore_eos is vLLM's and llmscale's; llama.cpp's server knows only min_tokens.
            body.update(ignore_eos=True, min_tokens=req.output_len)
        if self.endpoint == "chat":
            system = [{"role": "system", "content": req.prefix}] if req.prefix else []
            body["messages"] = [*system, {"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.text
        return body


def normalize_base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def served_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    """The first model the server lists; also the check that it answers at all."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = await client.get(f"{base_url}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot reach {base_url}: {e or type(e).__name__}") from None
    if resp.status_code != 200:
        raise ConfigError(f"{base_url}/v1/models answered HTTP {resp.status_code}: {_message(resp.text)}")
    data = resp.json().get("data") or []
    if not data:
        raise ConfigError(f"{base_url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])


def _message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg or text)[:300]
    except (ValueError, AttributeError):
        return text[:300]


def _chunk_text(chunk: dict[str, Any], endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send(client: httpx.AsyncClient, target: Target, req: BenchRequest, result: RequestResult,
               t0: float) -> None:
    """Fill `result` with this request's timings; failures land in `result.error`, never raise
    (cancellation excepted)."""
    start = time.perf_counter()
    result.start_s = start - t0
    chunks = 0
    last = start
    try:
        async with client.stream("POST", target.base_url + ENDPOINTS[target.endpoint],
                                 json=target.body(req), headers=target.headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {_message(text)}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ": ping" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {_message(data)}"
                    return
                if usage := chunk.get("usage"):
                    result.prompt_tokens = int(usage["prompt_tokens"])
                    result.output_tokens = int(usage["completion_tokens"])
                    result.usage_reported = True
                if _chunk_text(chunk, target.endpoint):
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, ValueError, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return
    result.e2e_s = time.perf_counter() - start
    if not result.usage_reported:
        result.output_tokens = chunks
    if result.ttft_s is None:
        result.error = "the stream carried no text"
        return
    result.success = True
