"""The OpenAI-compatible FastAPI app: `/v1/completions`, `/v1/chat/completions`, `/v1/models`,
`/health` and `/metrics`, in front of one `AsyncLLMEngine`."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmscale.config import ConfigError
from llmscale.engine.async_engine import EngineDeadError
from llmscale.engine.outputs import CompletionOutput, RequestOutput
from llmscale.engine.sampling_params import SamplingParams
from llmscale.serve.cost import CostModel
from llmscale.serve.engine_client import EngineClient
from llmscale.serve.metrics import ServerMetrics
from llmscale.serve.protocol import (
    CHAT_ROLES,
    INVALID_VALUE,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)

log = logging.getLogger(__name__)
COST_HEADER = "x-llmscale-cost-usd"
REPLICA_HEADER = "x-llmscale-replica"  # which engine replica served the response, behind a cluster
OPEN_PATHS = ("/health", "/metrics")  # liveness probes and Prometheus scrapes carry no API key
SHUTTING_DOWN = "the server shut down before this request finished (its drain timeout ran out)"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator and its run however the response ends. Starlette cancels the
    send when the client disconnects, which can leave the generator suspended at a `yield`,
    unclosed until garbage collection; closing now aborts the engine request and frees its KV
    blocks (and closes a run whose stream never started).

    A client leaving is handled inside Starlette's task group; a cancellation that reaches us
    is the server's drain timeout running out, and the stream then ends with an error event
    instead of a cut connection."""

    def __init__(self, content: AsyncGenerator[str, None], run: _Run) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", **run.headers()})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = ended = False

        async def noting_send(message: Message) -> None:
            nonlocal started, ended
            await send(message)
            started = True
            ended = message["type"] == "http.response.body" and not message.get("more_body", False)

        try:
            await super().__call__(scope, receive, noting_send)
        except asyncio.CancelledError:
            if not started:
                await error_response(503, SHUTTING_DOWN, "server_error")(scope, receive, send)
            elif not ended:
                await send({"type": "http.response.body", "body": sse_error(SHUTTING_DOWN).encode(),
                            "more_body": False})
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.run.close()


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


def sse_error(message: str) -> str:
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _watching_client(request: Request, handler: Awaitable[Response]) -> Response:
    """Runs a request's handler until it answers or its client disconnects, and then cancels it:
    that closes its engine stream, which aborts the request. A streaming response notices a
    departed client itself; without this a non-streaming one would run to its end.

    Neither path waits for the cancelled handler to unwind: once the drain timeout has cancelled
    the requests in flight, the server exits within a few turns of the event loop, and the
    answer must be out by then."""
    work = asyncio.ensure_future(handler)
    gone = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # only the server's drain timeout cancels a request
        work.cancel()
        return error_response(503, SHUTTING_DOWN, "server_error")
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        # Nobody reads this answer; 499 (nginx's "client closed request") marks it in access logs.
        return error_response(499, "client closed the request")
    return work.result()


class _Run:
    """One admitted request: its engine stream, and the bookkeeping when it ends (usage, cost,
    metrics), whether it finished, failed or its client left."""

    def __init__(self, server: _Server, gen: AsyncIterator[RequestOutput], first: RequestOutput,
                 start_s: float) -> None:
        self.server, self.gen, self.last, self.start_s = server, gen, first, start_s
        self.first_s = time.monotonic()  # the first token reached the server
        self.usage: Usage | None = None  # set by close()

    async def outputs(self) -> AsyncGenerator[RequestOutput, None]:
        try:
            yield self.last
            async for out in self.gen:
                self.last = out
                yield out
        finally:
            await self.close()

    async def drain(self) -> None:
        """Consume every output; `usage` is set after."""
        async with aclosing(self.outputs()) as outputs:
            async for _ in outputs:
                pass

    def model(self, default: str) -> str:
        """The model named in the response: the one that produced it."""
        return self.last.served_model or default

    def headers(self) -> dict[str, str]:
        """Known once the first output is in: the replica that serves the request, if several may."""
        served_by = self.last.served_by
        return {REPLICA_HEADER: served_by} if served_by is not None else {}

    async def close(self) -> None:
        if self.usage is None:
            await self.gen.aclose()  # type: ignore[attr-defined]
            self.usage = self.server.finish(self.last, self.start_s, self.first_s)


class _Server:
    def __init__(self, engine: EngineClient, model_name: str, max_queue: int, max_n: int,
                 cost: CostModel, replica_metrics: bool) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_queue = max_queue
        self.max_n = max_n
        self.cost = cost
        self.metrics = ServerMetrics(engine.states, model_name, replica_metrics)
        self.num_waiting = 0  # admitted, no output yet (includes those still in the engine's inbox)
        # Set where the server drains without closing its listener (a cluster's ingress behind
        # Serve's proxy): requests in flight finish, new ones get 503.
        self.draining = False

    # ----- shared request path ----------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}`", param="model", code="model_not_found")

    async def start(self, prompt: Any, params: SamplingParams, request_id: str) -> _Run:
        """Admit a request and wait for its first output, so validation errors from the engine
        (prompt longer than the context window, ...) still become a plain 400."""
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests", "server_error")
        if self.num_waiting >= self.max_queue:
            raise ApiError(429, f"server is busy: {self.num_waiting} requests are waiting",
                           type_="rate_limit_exceeded", headers={"Retry-After": "1"})
        start_s = time.monotonic()
        self.num_waiting += 1
        self.cost.request_started()
        gen = self.engine.generate(prompt, params, request_id)
        try:
            first = await gen.__anext__()
        except BaseException:
            await gen.aclose()  # type: ignore[attr-defined]
            self.cost.request_finished(0)
            raise
        finally:
            self.num_waiting -= 1
        return _Run(self, gen, first, start_s)

    async def run_to_end(self, run: _Run, prompt: Any, params: SamplingParams, request_id: str) -> _Run:
        """A plain (non-streamed) request, finished. Its client has seen nothing yet, so when its
        engine is lost midway (a cluster replica that died) it runs once more from the start."""
        try:
            await run.drain()
            return run
        except EngineDeadError as e:
            log.warning("request %s: %s; running it again", request_id, e)
        retry = await self.start(prompt, params, request_id)
        await retry.drain()
        return retry

    def finish(self, out: RequestOutput, start_s: float, first_s: float) -> Usage:
        prompt_tokens = len(out.prompt_token_ids)
        completion_tokens = sum(len(o.token_ids) for o in out.outputs)
        self.cost.request_finished(completion_tokens)
        cost = self.cost.cost_usd(prompt_tokens, completion_tokens)
        self.metrics.observe(out, prompt_tokens, completion_tokens, cost, time.monotonic() - start_s,
                             first_s - start_s)
        cached = out.metrics.num_cached_tokens if out.metrics is not None else 0
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached), cost_usd=cost)

    def sampling_params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                        logprobs: int | None) -> SamplingParams:
        if req.n > self.max_n:  # each choice is a sequence in the engine: n bounds one request's share
            raise ApiError(400, f"n must be <= {self.max_n} on this server, got {req.n}", param="n")
        optional = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty")
        kwargs = {k: v for k in optional if (v := getattr(req, k)) is not None}
        return SamplingParams(n=req.n, max_tokens=max_tokens, seed=req.seed, stop=req.stop,
                              logprobs=logprobs, ignore_eos=req.ignore_eos, **kwargs)

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def top(self, entry: dict[int, float], k: int) -> list[tuple[str, float]]:
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        return [(self.token_str(t), lp) for t, lp in best]

    # ----- completions ------------------------------------------------------------------------

    def completion_logprobs(self, o: CompletionOutput, start: int, k: int, offset: int,
                            lp: CompletionLogprobs | None = None) -> CompletionLogprobs:
        """Logprobs of generated tokens from `start` on, appended to `lp` (e.g. the prompt's)."""
        return self.append_logprobs(lp or CompletionLogprobs(), o.token_ids[start:],
                                    (o.logprobs or [])[start:], k, offset)

    def append_logprobs(self, lp: CompletionLogprobs, token_ids: list[int],
                        entries: list[dict[int, float] | None], k: int, offset: int) -> CompletionLogprobs:
        for tid, entry in zip(token_ids, entries, strict=False):
            tok = self.token_str(tid)
            lp.tokens.append(tok)
            lp.token_logprobs.append(None if entry is None else entry.get(tid))
            lp.top_logprobs.append(None if entry is None else dict(self.top(entry, k)))
            lp.text_offset.append(offset)
            offset += len(tok)
        return lp

    def prompt_logprobs(self, out: RequestOutput, k: int) -> CompletionLogprobs:
        """What `echo` with `logprobs` returns for the prompt: the first token has none."""
        return self.append_logprobs(CompletionLogprobs(), out.prompt_token_ids,
                                    out.prompt_logprobs or [], k, 0)

    async def completions(self, req: CompletionRequest) -> Response:
        self.check_model(req.model)
        prompt: Any = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "batched prompts are not supported; send one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        params = self.sampling_params(req, req.max_tokens, req.logprobs)
        if req.echo and req.logprobs is not None:
            params.prompt_logprobs = req.logprobs
        rid = f"cmpl-{uuid.uuid4().hex}"
        run = await self.start(prompt, params, rid)
        echo = ""
        if req.echo:
            echo = run.last.prompt or self.tokenizer.decode(run.last.prompt_token_ids)
        if req.stream:
            return self.stream(self.completion_chunks(req, params, run, rid, echo), run)
        run = await self.run_to_end(run, prompt, params, rid)
        k = req.logprobs
        choices = [CompletionChoice(
            index=o.index, text=echo + o.text, finish_reason=o.finish_reason,
            logprobs=None if k is None else self.completion_logprobs(
                o, 0, k, len(echo), self.prompt_logprobs(run.last, k) if echo else None))
            for o in run.last.outputs]
        body = CompletionResponse(id=rid, model=run.model(self.model_name), choices=choices, usage=run.usage)
        return self.json(body, run)

    async def completion_chunks(self, req: CompletionRequest, params: SamplingParams, run: _Run, rid: str,
                                echo: str) -> AsyncGenerator[str, None]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return _sse(CompletionResponse(id=rid, model=run.model(self.model_name), choices=choices,
                                           usage=usage))

        if echo:
            k = req.logprobs
            lp = None if k is None else self.prompt_logprobs(run.last, k)
            yield chunk([CompletionChoice(index=i, text=echo, logprobs=lp) for i in range(params.n)])
        offsets = [len(echo)] * params.n
        async with aclosing(self.deltas(run, params)) as deltas:
            async for index, delta, tok_start, o in deltas:
                lp = None
                if req.logprobs is not None:
                    lp = self.completion_logprobs(o, tok_start, req.logprobs, offsets[index])
                    offsets[index] += sum(len(t) for t in lp.tokens)
                yield chunk([CompletionChoice(index=index, text=delta, logprobs=lp,
                                              finish_reason=o.finish_reason)])
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], run.usage)
        yield "data: [DONE]\n\n"

    # ----- chat ------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[ChatMessage]) -> dict[str, Any]:
        if not messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        conversation = []
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise ApiError(400, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; "
                                    f"got {m.role!r}", param=f"messages[{i}].role")
            content = m.content
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
            conversation.append({"role": m.role, "content": content or ""})
        # Special-token text in a message stays text: users cannot forge the template's turns.
        text, ids = self.tokenizer.encode_chat(conversation, add_generation_prompt=True)
        return {"prompt": text, "prompt_token_ids": ids}

    def chat_logprobs(self, o: CompletionOutput, start: int, k: int) -> ChatLogprobs:
        content = []
        for tid, entry in zip(o.token_ids[start:], (o.logprobs or [])[start:], strict=False):
            tok = self.token_str(tid)
            content.append(ChatTokenLogprob(
                token=tok, logprob=entry.get(tid, float("-inf")), bytes=list(tok.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                              for t, lp in self.top(entry, k)]))
        return ChatLogprobs(content=content)

    async def chat(self, req: ChatCompletionRequest) -> Response:
        self.check_model(req.model)
        prompt = self.chat_prompt(req.messages)
        top_k = req.top_logprobs or 0
        params = self.sampling_params(req, req.max_completion_tokens or req.max_tokens,
                                      top_k if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        run = await self.start(prompt, params, rid)
        if req.stream:
            return self.stream(self.chat_chunks(req, params, run, rid), run)
        run = await self.run_to_end(run, prompt, params, rid)
        choices = [ChatChoice(index=o.index, message=ChatResponseMessage(content=o.text),
                              finish_reason=o.finish_reason,
                              logprobs=self.chat_logprobs(o, 0, top_k) if req.logprobs else None)
                   for o in run.last.outputs]
        body = ChatCompletionResponse(id=rid, model=run.model(self.model_name), choices=choices,
                                      usage=run.usage)
        return self.json(body, run)

    async def chat_chunks(self, req: ChatCompletionRequest, params: SamplingParams, run: _Run,
                          rid: str) -> AsyncGenerator[str, None]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return _sse(ChatCompletionChunk(id=rid, model=run.model(self.model_name), choices=choices,
                                            usage=usage))

        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                     for i in range(params.n)])
        async with aclosing(self.deltas(run, params)) as deltas:
            async for index, delta, tok_start, o in deltas:
                lp = self.chat_logprobs(o, tok_start, req.top_logprobs or 0) if req.logprobs else None
                yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=delta or None),
                                             logprobs=lp, finish_reason=o.finish_reason)])
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], run.usage)
        yield "data: [DONE]\n\n"

    # ----- streaming ---------------------------------------------------------------------------

    async def deltas(self, run: _Run, params: SamplingParams
                     ) -> AsyncGenerator[tuple[int, str, int, CompletionOutput], None]:
        """Per choice and step: (index, new text, index of its first new token, output).

        While a choice runs, the last len(longest stop) - 1 characters are held back: they
        could be the start of a stop string, which the engine cuts from the text once complete.
        """
        hold = max((len(s) for s in params.stop or []), default=1) - 1
        sent_chars = [0] * params.n
        sent_tokens = [0] * params.n
        done = [False] * params.n
        async with aclosing(run.outputs()) as outputs:
            async for out in outputs:
                for o in out.outputs:
                    if done[o.index]:
                        continue
                    end = len(o.text) if o.finished else max(sent_chars[o.index], len(o.text) - hold)
                    delta = o.text[sent_chars[o.index]:end]
                    if not delta and not o.finished and len(o.token_ids) == sent_tokens[o.index]:
                        continue
                    yield o.index, delta, sent_tokens[o.index], o
                    sent_chars[o.index], sent_tokens[o.index] = end, len(o.token_ids)
                    done[o.index] = o.finished

    def stream(self, chunks: AsyncGenerator[str, None], run: _Run) -> StreamingResponse:
        async def guarded() -> AsyncGenerator[str, None]:
            # Headers are out: a failure can only be reported in the stream itself.
            async with aclosing(chunks):
                try:
                    async for c in chunks:
                        yield c
                except EngineDeadError as e:
                    yield sse_error(str(e))

        return _ClosingStreamingResponse(guarded(), run)

    @staticmethod
    def json(body: BaseModel, run: _Run) -> JSONResponse:
        assert run.usage is not None
        headers = {COST_HEADER: f"{run.usage.cost_usd or 0.0:.10f}", **run.headers()}
        return JSONResponse(body.model_dump(mode="json"), headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": "), None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", param


def _validation_status(exc: RequestValidationError) -> int:
    """400 when every error is a refused value (protocol's INVALID_VALUE), else 422 (a bad shape)."""
    return 400 if all(err.get("type") == INVALID_VALUE for err in exc.errors()) else 422


class RequireApiKey:
    """401 without `Authorization: Bearer <key>` on every path but OPEN_PATHS: denying by default
    covers /openapi.json (a map of the API) and any route added later."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            auth = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(auth, self.expected):
                response = error_response(401, "Incorrect API key provided", code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class LimitBody:
    """413 for a request body over `max_bytes`, read no further than the limit: a declared
    Content-Length is refused before any of the body is read, a chunked body once its bytes pass
    the limit (uvicorn buffers only a little ahead of the reader)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"request body is larger than this server's limit of {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, self.message)(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI hands an HTTPException raised while it reads the body to the handlers.
                raise StarletteHTTPException(413, self.message)
            return message

        await self.app(scope, counting_receive, send)


def create_app(engine: EngineClient, served_model_name: str | None = None, api_key: str | None = None,
               max_queue: int = 1024, cost: CostModel | None = None, *, max_n: int,
               max_body_bytes: int, replica_metrics: bool = False) -> FastAPI:
    """The OpenAI API in front of `engine`; `replica_metrics`: label engine gauges per replica."""
    server = _Server(engine, served_model_name or engine.model_name, max_queue, max_n,
                     cost or CostModel(), replica_metrics)
    # /openapi.json stays (behind the key, if any); /docs and /redoc stay off: they load their
    # scripts from a CDN, and their pages fetch /openapi.json without the key.
    app = FastAPI(title="llmscale", docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)  # added last, so it runs first

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(ConfigError)
    async def on_config_error(_: Request, e: ConfigError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return error_response(_validation_status(e), message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(EngineDeadError)
    async def on_engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(503, str(e), "server_error")

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")  # the traceback stays in the server log
        return error_response(500, "internal server error", "server_error")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await _watching_client(request, server.completions(req))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await _watching_client(request, server.chat(req))

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=server.model_name, max_model_len=engine.max_model_len)])

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return Response(status_code=200)
        return error_response(503, "engine loop is not running", "server_error")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
