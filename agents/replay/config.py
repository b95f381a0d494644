"""What a replay needs to know besides the workload: where the server is, how hard to push it,
how to shape requests, what to call the run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import urlparse

TAG_FIELDS = ("vllm_xargs", "none")


@dataclass
class ReplayConfig:
    """One replay against one OpenAI-compatible endpoint (``conf/replay.yaml`` holds the same keys)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """The server's OpenAI API root; requests go to ``{base_url}/completions``."""
    model: str = "default"
    """The ``model`` field of every request (``vllm serve``: the model's path or --served-model-name)."""
    label: str = "server"
    """What the server runs (e.g. fcfs, servegym_policy): the ``policy`` column of the tables."""
    max_connections: int = 32
    """Requests in flight at most (and the HTTP connection pool's size); a ready call waits for a
    free slot, and that wait counts in its tree's time but not in its TTFT."""
    request_timeout_s: float = 120.0
    """Wall-clock limit of one attempt, from sending to the last streamed token."""
    max_retries: int = 2
    """Attempts after the first for a call that failed (connection error, timeout, HTTP 408, 429
    or 5xx); other HTTP errors (a 400 for a prompt too long) are not retried. Every retry is
    counted; a call that fails every attempt fails its tree, and its descendants are never sent."""
    retry_backoff_s: float = 0.5
    """Sleep before retry k (k = 1, 2, ...): ``retry_backoff_s * 2 ** (k - 1)``."""
    tool_time_scale: float = 1.0
    """Multiplies every tool latency (the pause after a call before its children are ready);
    0 drops them (a pure serving benchmark), 1 replays them as the workload says."""
    ignore_eos: bool = True
    """Send vLLM's ``ignore_eos`` so each call generates exactly ``min(output_tokens, max_tokens)``
    as the workload says; false: the model may stop early (and a server that rejects unknown
    fields needs false)."""
    tag_field: str = "vllm_xargs"
    """How a request carries its tree tag (``servegym.agents.deploy.vllm_adapter``'s convention):
    ``vllm_xargs`` sends ``{"vllm_xargs": {"servegym_tree": tag}}`` (vLLM puts it in
    ``SamplingParams.extra_args``); ``none`` sends no tag (servers that reject unknown fields)."""
    vocab_size: int = 1000
    """Prompt words are ``w4`` .. ``w<vocab_size - 1>``: one token each under the tests'
    word-level tokenizer; a subword tokenizer may split a word into several tokens, so prompt
    lengths are then a multiple of the workload's."""
    priority_policy: str | None = None
    """Send vLLM's ``priority`` field from ``servegym.agents.deploy.vllm_adapter.PriorityRoute`` with
    this policy (``policy.onnx`` path or ``module:attr``); for a server started with
    ``--scheduling-policy priority``. None: no priority field."""
    priority_horizon_s: float = 0.2
    """``PriorityRoute``'s overtaking horizon, in seconds of the replay's clock."""

    def __post_init__(self) -> None:
        url = urlparse(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"ReplayConfig.base_url must be an http(s) URL, got {self.base_url!r}")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ValueError(
                f"ReplayConfig.max_connections must be an int >= 1, got {self.max_connections!r}"
            )
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"ReplayConfig.max_retries must be an int >= 0, got {self.max_retries!r}")
        for name in ("request_timeout_s",):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ReplayConfig.{name} must be a finite number of seconds > 0, got {value!r}")
        for name in ("retry_backoff_s", "tool_time_scale", "priority_horizon_s"):
            value = getattr(self, name)
            if not value >= 0 or (name != "priority_horizon_s" and not math.isfinite(value)):
                raise ValueError(f"ReplayConfig.{name} must be a number >= 0, got {value!r}")
        if self.tag_field not in TAG_FIELDS:
            raise ValueError(f"ReplayConfig.tag_field must be one of {TAG_FIELDS}, got {self.tag_field!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 5:
            raise ValueError(f"ReplayConfig.vocab_size must be an int >= 5, got {self.vocab_size!r}")
        if not self.label or not isinstance(self.label, str):
            raise ValueError(f"ReplayConfig.label must be a non-empty string, got {self.label!r}")

    @property
    def completions_url(self) -> str:
        return self.base_url.rstrip("/") + "/completions"
