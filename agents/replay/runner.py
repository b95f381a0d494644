"""The replay loop: trees arrive on the workload's schedule, each call is sent once its parents
have finished and their tool latencies have passed, with its prompt built from their real outputs.

Time is the replay's own clock (seconds since it started); tree time = finish of its last call -
arrival, the engine's definition, so the numbers read like the simulator's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from servegym.agents.deploy.vllm_adapter import TREE_TAG_KEY, PendingRequest, PriorityRoute, TreeTag
from servegym.agents.replay.client import Completion, CompletionClient
from servegym.agents.replay.config import ReplayConfig
from servegym.agents.replay.prompts import PromptBuilder
from servegym.envs.workloads.job import Job
from servegym.envs.workloads.source import JobSource


@dataclass
class CallRecord:
    """One call of one tree as the server served it (times on the replay clock, seconds)."""

    job_id: str
    call_id: int
    role: str
    depth: int
    tag: str
    ready_s: float
    prompt_words: int
    max_tokens: int
    completion: Completion
    priority: int | None = None
    skipped: bool = False
    """Never sent: a parent failed."""

    @property
    def ok(self) -> bool:
        return self.completion.ok and not self.skipped


@dataclass
class TreeRecord:
    job_id: str
    kind: str
    arrival_s: float
    finish_s: float
    num_calls: int
    calls_ok: int

    @property
    def failed(self) -> bool:
        return self.calls_ok < self.num_calls

    @property
    def jct_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass
class ReplayResult:
    calls: list[CallRecord] = field(default_factory=list)
    trees: list[TreeRecord] = field(default_factory=list)
    wall_s: float = 0.0


def tree_id_of(job: Job) -> str:
    """The job id as a tree tag's ``tree_id`` (no ``:``, non-empty)."""
    return job.job_id.replace(":", "_") or "_"


class Replayer:
    """Replays one ``JobSource`` through one ``CompletionClient``; ``run()`` once."""

    def __init__(self, config: ReplayConfig, client: CompletionClient | None = None) -> None:
        self.config = config
        self.start_s = time.perf_counter()
        self.client = client or CompletionClient(
            config.completions_url,
            config.max_connections,
            config.request_timeout_s,
            config.max_retries,
            config.retry_backoff_s,
            clock=self.now,
        )
        self.slots = asyncio.Semaphore(config.max_connections)
        self.prompts = PromptBuilder(config.vocab_size)
        self.route = (
            PriorityRoute(config.priority_policy, horizon_s=config.priority_horizon_s, clock=self.now)
            if config.priority_policy
            else None
        )
        self.result = ReplayResult()
        self.source: JobSource | None = None

    def now(self) -> float:
        return time.perf_counter() - self.start_s

    async def _until(self, when_s: float) -> None:
        delay = when_s - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    async def run(self, source: JobSource) -> ReplayResult:
        """Every tree of ``source`` (and those a closed loop releases) to the end, failed or not."""
        self.start_s = time.perf_counter()
        self.source = source
        pending: set[asyncio.Task] = set()

        def launch(jobs: Iterable[Job]) -> None:
            for job in jobs:
                pending.add(asyncio.ensure_future(self._tree(job, launch)))

        try:
            initial = source.initial_jobs()
            ordered = (
                initial if getattr(source, "streaming", False) else sorted(initial, key=lambda j: j.arrival_s)
            )
            for job in ordered:  # pull a stream one job ahead of the clock
                await self._until(job.arrival_s)
                launch((job,))
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                pending -= done
                for task in done:
                    task.result()  # a bug in the replay itself surfaces here, not silently
        finally:
            for task in pending:
                task.cancel()
            await self.client.aclose()
        self.result.wall_s = self.now()
        return self.result

    async def _tree(self, job: Job, launch: Callable[[Iterable[Job]], None]) -> None:
        await self._until(job.arrival_s)
        outputs: dict[int, str] = {}
        finish_s: dict[int, float] = {}
        done = [asyncio.Event() for _ in job.calls]
        failed = [False] * len(job.calls)
        depths = job.depth()
        records: list[CallRecord] = []

        async def run_call(index: int) -> None:
            call = job.calls[index]
            for parent in call.parents:
                await done[parent].wait()
            tag = TreeTag(tree_id_of(job), index, call.role.replace(":", "_"), depths[index]).encode()
            if any(failed[p] for p in call.parents):
                failed[index] = True
                skipped = Completion(errors=["not sent: a parent call failed"])
                records.append(
                    CallRecord(
                        job.job_id,
                        index,
                        call.role,
                        depths[index],
                        tag,
                        self.now(),
                        0,
                        call.generated_tokens,
                        skipped,
                        skipped=True,
                    )
                )
                done[index].set()
                return
            ready_s = max(
                (
                    finish_s[p] + self.config.tool_time_scale * job.calls[p].tool_latency_s
                    for p in call.parents
                ),
                default=job.arrival_s,
            )
            await self._until(ready_s)
            prompt = self.prompts.prompt(job, index, outputs)
            record = CallRecord(
                job.job_id,
                index,
                call.role,
                depths[index],
                tag,
                ready_s,
                len(prompt.split()),
                call.generated_tokens,
                Completion(),
            )
            body = self._body(prompt, record)
            async with self.slots:
                record.completion = await self.client.complete(body)
            if self.route is not None:
                pending = PendingRequest(
                    record.prompt_words,
                    record.max_tokens,
                    tag,
                    num_output_tokens=record.completion.output_tokens,
                )
                self.route.finish(pending, self.now())
            if record.completion.ok:
                outputs[index] = record.completion.text
                finish_s[index] = record.completion.end_s
            else:
                failed[index] = True
            records.append(record)
            done[index].set()

        await asyncio.gather(*(run_call(i) for i in range(len(job.calls))))
        ends = [r.completion.end_s for r in records if r.ok]
        finish = max(ends) if ends else self.now()
        records.sort(key=lambda r: r.call_id)
        self.result.calls.extend(records)
        self.result.trees.append(
            TreeRecord(
                job.job_id, job.kind, job.arrival_s, finish, len(job.calls), sum(r.ok for r in records)
            )
        )
        assert self.source is not None, "run() sets the source before any tree starts"
        launch(self.source.on_job_finished(job, finish))  # a closed loop's next job

    def _body(self, prompt: str, record: CallRecord) -> dict:
        body: dict = {
            "model": self.config.model,
            "prompt": prompt,
            "max_tokens": record.max_tokens,
            "temperature": 0.0,
        }
        if self.config.ignore_eos:
            body["ignore_eos"] = True
        if self.config.tag_field == "vllm_xargs":
            body["vllm_xargs"] = {TREE_TAG_KEY: record.tag}
        if self.route is not None:
            pending = PendingRequest(record.prompt_words, record.max_tokens, record.tag)
            (record.priority,) = self.route.priorities([pending], self.now())
            body["priority"] = record.priority
        return body


def replay(source: JobSource, config: ReplayConfig) -> ReplayResult:
    """Run a replay to the end in a fresh event loop (``asyncio.run``)."""

    async def main() -> ReplayResult:
        return await Replayer(config).run(source)

    return asyncio.run(main())
