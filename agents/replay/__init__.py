"""Replay servegym workloads (agent trees) against any OpenAI-compatible completions endpoint.

One concept per module: ``config`` (where and how hard), ``prompts`` (a call's prompt text from
its segments and its parents' real outputs), ``client`` (one streamed completion with timeout and
retries, timed: TTFT, TPOT), ``runner`` (trees arrive on schedule, calls go out when their parents
finished and tool latencies passed), ``tables`` (the evaluation's tables and plots).

``scripts/replay.py`` is the Hydra entry point (``conf/replay.yaml``, the same ``workload=`` group
as ``scripts/evaluate.py``). Requests carry their tree tag the way ``servegym.agents.deploy.vllm_adapter``
reads it (``vllm_xargs``), so a ``vllm serve --scheduler-cls ...ServegymScheduler`` sees trees.
"""

from servegym.agents.replay.client import Completion, CompletionClient, RequestFailed
from servegym.agents.replay.config import ReplayConfig
from servegym.agents.replay.prompts import PromptBuilder
from servegym.agents.replay.runner import CallRecord, Replayer, ReplayResult, TreeRecord, replay
from servegym.agents.replay.tables import calls_frame, jobs_frame, run_row, write_report

__all__ = [
    "CallRecord",
    "Completion",
    "CompletionClient",
    "PromptBuilder",
    "ReplayConfig",
    "ReplayResult",
    "Replayer",
    "RequestFailed",
    "TreeRecord",
    "calls_frame",
    "jobs_frame",
    "replay",
    "run_row",
    "write_report",
]
