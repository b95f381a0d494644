"""One streamed completion from an OpenAI-compatible server, with a per-attempt timeout and
retries, timed the way serving benchmarks time it: TTFT from sending to the first generated text,
TPOT over the remaining tokens.

Uses ``httpx`` (the transport under the ``openai`` client) directly, so the request body can carry
vLLM's extension fields (``vllm_xargs``, ``ignore_eos``, ``priority``) without an SDK's
validation, and the pool size is explicit."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class RequestFailed(Exception):
    """An attempt failed. ``retryable``: worth another attempt (connection, timeout, 408/429/5xx)."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Completion:
    """The outcome of one call: the text and the timings of its last attempt, and how many tries."""

    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int | None = None
    sent_s: float = float("nan")
    first_token_s: float = float("nan")
    end_s: float = float("nan")
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    ok: bool = False

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.sent_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (NaN for fewer than two tokens)."""
        if self.output_tokens < 2:
            return float("nan")
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def retries(self) -> int:
        return max(self.attempts - 1, 0)


class CompletionClient:
    """Streams completions from ``url`` through one ``httpx.AsyncClient`` with at most
    ``max_connections`` connections; ``clock`` is the replay's clock (seconds)."""

    def __init__(
        self,
        url: str,
        max_connections: int,
        request_timeout_s: float,
        max_retries: int,
        retry_backoff_s: float,
        clock=time.perf_counter,
    ) -> None:
        self.url = url
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.clock = clock
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        # the pool wait is bounded by the caller's semaphore; connect/read each get the attempt's limit
        self.http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(request_timeout_s, pool=None))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def complete(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> Completion:
        """Send ``body`` (``stream`` is set here) until an attempt succeeds, a non-retryable error
        comes back, or ``1 + max_retries`` attempts failed; never raises for a failed request."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        result = Completion()
        for attempt in range(1 + self.max_retries):
            if attempt:
                await asyncio.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            result.attempts = attempt + 1
            try:
                await asyncio.wait_for(self._attempt(body, headers, result), self.request_timeout_s)
                result.ok = True
                return result
            except (TimeoutError, asyncio.TimeoutError):
                result.errors.append(
                    f"attempt {attempt + 1}: no complete answer in {self.request_timeout_s:g} s"
                )
            except httpx.HTTPError as error:
                result.errors.append(f"attempt {attempt + 1}: {type(error).__name__}: {error}")
            except RequestFailed as error:
                result.errors.append(f"attempt {attempt + 1}: {error}")
                if not error.retryable:
                    return result
        return result

    async def _attempt(
        self, body: dict[str, Any], headers: dict[str, str] | None, result: Completion
    ) -> None:
        result.text, result.output_tokens, result.prompt_tokens = "", 0, None
        result.first_token_s = result.end_s = float("nan")
        pieces: list[str] = []
        chunks = 0
        result.sent_s = self.clock()
        async with self.http.stream("POST", self.url, json=body, headers=headers) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                raise RequestFailed(
                    f"HTTP {response.status_code}: {detail}",
                    retryable=response.status_code in RETRYABLE_STATUS,
                )
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RequestFailed(f"server error in stream: {event['error']}", retryable=True)
                for choice in event.get("choices") or ():
                    text = choice.get("text") or ""
                    if text:
                        if not pieces:
                            result.first_token_s = self.clock()
                        pieces.append(text)
                        chunks += 1
                usage = event.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
            if not done:
                raise RequestFailed("stream ended before [DONE]", retryable=True)
        result.end_s = self.clock()
        result.text = "".join(pieces)
        if not result.output_tokens:
            result.output_tokens = chunks  # no usage block: one streamed chunk per token (vLLM's default)
        if not pieces:
            result.first_token_s = result.end_s
