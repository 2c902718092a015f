"""`ClusterEngineClient`: the `EngineClient` the ingress serves the OpenAI API on, backed by the
engine replicas behind a Ray Serve handle.

Prompts are tokenized here, so the router sees token ids and can match cached prefixes. A
replica that dies before a request produced anything costs that request nothing: it is sent
once more, to another replica. One that dies mid-stream ends the stream with an error (the
client already holds tokens that no other replica would continue exactly). With a fallback
deployment, requests go to it while the main deployment has no replica ready.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from llmscale.cluster.routing import ReplicaRequest
from llmscale.config import ConfigError
from llmscale.engine.async_engine import EngineDeadError
from llmscale.engine.llm_engine import EngineState, tokenize_prompt
from llmscale.engine.outputs import RequestOutput
from llmscale.engine.sampling_params import SamplingParams
from llmscale.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# A replica gone (process died, node lost, being replaced): the request may go elsewhere.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
ATTEMPTS = 2  # the first try and one retry on another replica


class ClusterEngineClient:
    def __init__(self, replicas: DeploymentHandle, tokenizer: Tokenizer, model_name: str,
                 max_model_len: int, states: Callable[[], dict[str, EngineState]],
                 fallback: DeploymentHandle | None = None, main_ready: Callable[[], bool] = lambda: True
                 ) -> None:
        """`states`: the replicas' last reported engine states by replica id. `fallback`: the
        deployment that answers while `main_ready()` says no replica of the main one is ready;
        meanwhile one call waits on the main deployment, so a deployment at zero starts one."""
        self.main = replicas
        self.replicas = replicas.options(stream=True)
        self.fallback = fallback.options(stream=True) if fallback is not None else None
        self.main_ready = main_ready
        self.waking: asyncio.Future[Any] | None = None
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.states = states

    def _target(self) -> DeploymentHandle:
        """The main deployment, or the fallback while the main has no replica ready."""
        if self.fallback is None or self.main_ready():
            return self.replicas
        if self.waking is None or self.waking.done():
            self.waking = asyncio.ensure_future(self._wake())
        return self.fallback

    async def _wake(self) -> None:
        try:
            await self.main.wake.remote()
        except REPLICA_LOST as e:  # the next request routed to the fallback tries again
            log.warning("waking the main deployment failed: %s", type(e).__name__)

    @property
    def is_running(self) -> bool:
        return True  # the ingress is up; whether a replica can serve shows per request

    async def generate(self, prompt: Any, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        text, ids = tokenize_prompt(self.tokenizer, prompt)
        request = ReplicaRequest(request_id or f"req-{uuid.uuid4().hex}", ids, text, params)
        for attempt in range(1, ATTEMPTS + 1):
            stream = self._target().generate.remote(request)
            produced = False
            try:
                async for out in stream:
                    if isinstance(out, ConfigError):  # the engine refused the request
                        raise ConfigError(str(out))
                    produced = True
                    yield out
                return
            except RayTaskError as e:
                raise EngineDeadError(f"replica failed: {type(e.cause).__name__}: {e.cause}") from None
            except REPLICA_LOST as e:
                if produced or attempt == ATTEMPTS:
                    raise EngineDeadError(f"the replica serving this request was lost "
                                          f"({type(e).__name__})") from None
                log.warning("request %s: replica lost before any output, sent again", request.request_id)
            finally:
                stream.cancel()  # a client gone mid-stream aborts the request on its replica
