"""Seeded generators of agent trees (Jobs) with the shapes agent frameworks produce.

Each generator is a small config dataclass; ``sample(rng, job_id, arrival_s, tenant)`` draws one
Job from it. Prompts are built from segments so that sharing is explicit: a role's system prompt
is one ``Text`` key shared by every job, the job input is one key shared by every call of the job,
and a call that continues an earlier one repeats that call's prompt and appends ``Output(prev)``
plus the new tool result, so its whole history is a reusable prefix. Prefix caching and eviction
choices therefore compound down the tree, as in real agent serving.

Length defaults follow published trace statistics (Azure LLM 2023, Mooncake, AgentX, Continuum);
each field says which number it follows. They are kept moderate (a few K to ~15K tokens of context per call) so a
simulation of hundreds of jobs on an 8B-shaped model stays realistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import numpy as np

from servegym.envs.workloads.job import Call, Job, Output, Segment, Text


class Generator(Protocol):
    """Anything that draws Jobs from a seeded rng (every class below, and ``Mixed`` itself)."""

    name: ClassVar[str]

    def sample(
        self, rng: np.random.Generator, job_id: str, arrival_s: float, tenant: str = "default"
    ) -> Job: ...


def sample_tool_latency_s(rng: np.random.Generator, max_s: float = 60.0) -> float:
    """One tool-return gap, log-uniform within bins that reproduce vLLM router #285's coding
    trace (86.5% within 1 s, 95.1% within 10 s) and Continuum's range ("ms to tens of s")."""
    u = rng.random()
    low, high = (1e-3, 1.0) if u < 0.865 else (1.0, 10.0) if u < 0.951 else (10.0, max_s)
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _prompt_tokens(calls: Sequence[Call], prompt: Sequence[Segment]) -> int:
    """Prompt length with earlier calls' outputs at their budgeted lengths (as ``Job.prompt_tokens``)."""
    return sum(s.num_tokens if isinstance(s, Text) else calls[s.call].generated_tokens for s in prompt)


@dataclass
class AgentGenerator:
    """Length, budget and tool knobs shared by every tree shape; subclasses add the structure."""

    name: ClassVar[str] = "agent"

    system_tokens: int = 1024
    """System prompt length of every role. With the input, the first prompt is ~2K tokens,
    the Azure LLM 2023 code trace's input mean (2,048)."""
    input_tokens_mean: float = 1024.0
    """Mean job input (task, question, document chunk); Azure 2023 conv input mean 1,155, p50 1,020."""
    tool_tokens_mean: float = 800.0
    """Mean tool-result length; Codex/SWE-bench traces add "a few hundred to a few thousand" tokens
    per turn (low end, to keep contexts moderate)."""
    output_tokens_mean: float = 300.0
    """Mean natural output length; Mooncake conversation output mean 343, Azure conv 211, AgentX
    median 444."""
    length_sigma: float = 0.8
    """Lognormal shape of every length: sqrt(2 ln(mean/p50)) is 0.5 for Azure conv inputs, 0.8 for
    Azure code inputs and 1.05 for Mooncake conversation inputs."""
    max_tokens: int = 1024
    """Output budget of every role; near Mooncake's output p99 (1,119), so a few % of calls hit it."""
    max_context_tokens: int = 32768
    """No call's prompt plus budget may exceed this: growing chains stop early, fixed shapes are
    checked here at construction."""
    tool_latency_max_s: float = 60.0
    """Longest tool-return gap (Continuum: tool times range "from ms to tens of s")."""
    system_per_tenant: bool = False
    """Give each tenant its own system prompts (no cross-tenant prefix sharing)."""
    slo_s: float | None = None
    """End-to-end latency target set on every job, or None."""

    def __post_init__(self) -> None:
        for name in ("system_tokens", "max_tokens", "max_context_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be an int >= 1, got {value!r}")
        for name in ("input_tokens_mean", "tool_tokens_mean", "output_tokens_mean", "length_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{type(self).__name__}.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.tool_latency_max_s > 10.0:
            raise ValueError(
                f"{type(self).__name__}.tool_latency_max_s must be > 10 s (4.9% of tool gaps exceed "
                f"10 s), got {self.tool_latency_max_s!r}"
            )
        if self.slo_s is not None and not self.slo_s > 0:
            raise ValueError(f"{type(self).__name__}.slo_s must be > 0 or None, got {self.slo_s!r}")
        self._check_structure()
        worst = self._worst_prompt_tokens() + self.max_tokens
        if worst > self.max_context_tokens:
            raise ValueError(
                f"{type(self).__name__}: the largest call can reach {worst} tokens (prompt + max_tokens) "
                f"> max_context_tokens={self.max_context_tokens}; lower max_tokens, the token means or "
                "the tree size, or raise max_context_tokens"
            )

    def _check_structure(self) -> None:
        """Validate the subclass's structural fields (counts, probabilities)."""

    def _worst_prompt_tokens(self) -> int:
        """Upper bound on the prompt of the largest fixed-shape call (growing chains cap themselves)."""
        return self.system_tokens + self._cap(self.input_tokens_mean)

    def _cap(self, mean: float) -> int:
        """Upper clip of a sampled text length: 4x its mean (~2% of draws at sigma 0.8)."""
        return max(1, int(4 * mean))

    def _length(self, rng: np.random.Generator, mean: float, clip: bool = True) -> int:
        """A lognormal length with the given mean (clipped to ``_cap`` for prompt texts)."""
        value = rng.lognormal(math.log(mean) - self.length_sigma**2 / 2, self.length_sigma)
        return max(1, min(int(round(value)), self._cap(mean)) if clip else int(round(value)))

    def _system_key(self, role: str, tenant: str) -> str:
        # The generator name is part of the key: equal keys must mean equal tokens, and two
        # generators (say in a Mixed workload) may give the same role different system prompts.
        return f"sys/{tenant}/{self.name}/{role}" if self.system_per_tenant else f"sys/{self.name}/{role}"

    def _system(self, role: str, tenant: str) -> Text:
        return Text(self._system_key(role, tenant), self.system_tokens)

    def _add(
        self,
        calls: list[Call],
        rng: np.random.Generator,
        role: str,
        prompt: Sequence[Segment],
        parents: Sequence[int] = (),
        tool: bool = False,
    ) -> int:
        """Append a call with a sampled natural output (and tool gap if it calls a tool)."""
        call = Call(
            call_id=len(calls),
            role=role,
            prompt=tuple(prompt),
            output_tokens=self._length(rng, self.output_tokens_mean, clip=False),
            max_tokens=self.max_tokens,
            parents=tuple(parents),
            tool_latency_s=sample_tool_latency_s(rng, self.tool_latency_max_s) if tool else 0.0,
        )
        assert self._fits(calls, call.prompt), "generator bug: a call exceeds max_context_tokens"
        calls.append(call)
        return call.call_id

    def _fits(self, calls: Sequence[Call], prompt: Sequence[Segment]) -> bool:
        return _prompt_tokens(calls, prompt) + self.max_tokens <= self.max_context_tokens

    def _job(self, job_id: str, arrival_s: float, calls: list[Call], tenant: str, **meta: object) -> Job:
        return Job(
            job_id, arrival_s, tuple(calls), tenant=tenant, kind=self.name, slo_s=self.slo_s, meta=meta
        )


@dataclass
class ReactChain(AgentGenerator):
    """A ReAct agent: think/act steps in sequence, a tool call between steps, context growing.

    Step k+1's prompt is step k's prompt + ``Output(k)`` + the tool result, so each step can reuse
    the previous step's whole KV. The chain stops early if the next step would not fit.
    """

    name: ClassVar[str] = "react"

    turns_mean: float = 6.3
    """Mean number of steps (1 + Poisson); Continuum: BFCL 6.3 turns, SWE-bench 10.9."""
    max_turns: int = 64
    """Hard cap on steps (AgentX sessions have a median of 43 turns)."""

    def _check_structure(self) -> None:
        if not self.turns_mean >= 1:
            raise ValueError(f"ReactChain.turns_mean must be >= 1, got {self.turns_mean!r}")
        if not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise ValueError(f"ReactChain.max_turns must be an int >= 1, got {self.max_turns!r}")

    def sample(self, rng: np.random.Generator, job_id: str, arrival_s: float, tenant: str = "default") -> Job:
        turns = min(1 + int(rng.poisson(self.turns_mean - 1)), self.max_turns)
        calls: list[Call] = []
        prompt: tuple[Segment, ...] = (
            self._system("tool_user", tenant),
            Text(f"{job_id}/input", self._length(rng, self.input_tokens_mean)),
        )
        for step in range(turns):
            prev = self._add(calls, rng, "tool_user", prompt, parents=(step - 1,) if step else (), tool=True)
            tool_result = Text(f"{job_id}/tool{step}", self._length(rng, self.tool_tokens_mean))
            prompt = (*prompt, Output(prev), tool_result)
            if step == turns - 1 or not self._fits(calls, prompt):
                break
        calls[-1] = replace(calls[-1], tool_latency_s=0.0)  # the final answer calls no tool
        return self._job(job_id, arrival_s, calls, tenant, turns=len(calls))


@dataclass
class MapReduce(AgentGenerator):
    """Planner -> ``fan_out`` parallel workers -> aggregator (Parrot's map-reduce summarisation).

    Workers share the prefix system + input + plan and differ only in their own chunk; the
    aggregator's prompt holds every worker's output.
    """

    name: ClassVar[str] = "map_reduce"

    fan_out: int = 4
    """Number of parallel workers."""

    def _check_structure(self) -> None:
        if not isinstance(self.fan_out, int) or self.fan_out < 1:
            raise ValueError(f"MapReduce.fan_out must be an int >= 1, got {self.fan_out!r}")

    def _worst_prompt_tokens(self) -> int:
        base = super()._worst_prompt_tokens()
        return base + max(self.max_tokens + self._cap(self.input_tokens_mean), self.fan_out * self.max_tokens)

    def sample(self, rng: np.random.Generator, job_id: str, arrival_s: float, tenant: str = "default") -> Job:
        calls: list[Call] = []
        question = Text(f"{job_id}/input", self._length(rng, self.input_tokens_mean))
        plan = self._add(calls, rng, "planner", (self._system("planner", tenant), question))
        workers = [
            self._add(
                calls,
                rng,
                "worker",
                (
                    self._system("worker", tenant),
                    question,
                    Output(plan),
                    Text(f"{job_id}/chunk{i}", self._length(rng, self.input_tokens_mean)),
                ),
                parents=(plan,),
            )
            for i in range(self.fan_out)
        ]
        outputs = tuple(Output(w) for w in workers)
        self._add(
            calls,
            rng,
            "aggregator",
            (self._system("aggregator", tenant), question, *outputs),
            parents=workers,
        )
        return self._job(job_id, arrival_s, calls, tenant)


@dataclass
class PlanExecuteCritique(AgentGenerator):
    """Planner -> executor (runs a tool) -> critic; a rejection adds an executor + critic pair.

    Each retry's executor and critic extend the previous ones' prompts with the new outputs and
    tool result, so retries see the whole history and reuse its prefix.
    """

    name: ClassVar[str] = "plan_execute_critique"

    reject_prob: float = 0.3
    """Chance the critic rejects an attempt (no anchor; a moderate retry rate)."""
    max_retries: int = 2
    """Most extra executor + critic rounds after the first."""

    def _check_structure(self) -> None:
        if not 0.0 <= self.reject_prob <= 1.0:
            raise ValueError(f"PlanExecuteCritique.reject_prob must be in [0, 1], got {self.reject_prob!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"PlanExecuteCritique.max_retries must be an int >= 0, got {self.max_retries!r}")

    def _worst_prompt_tokens(self) -> int:  # the first critic: plan, execution and tool result
        return super()._worst_prompt_tokens() + 2 * self.max_tokens + self._cap(self.tool_tokens_mean)

    def sample(self, rng: np.random.Generator, job_id: str, arrival_s: float, tenant: str = "default") -> Job:
        calls: list[Call] = []
        question = Text(f"{job_id}/input", self._length(rng, self.input_tokens_mean))
        plan = self._add(calls, rng, "planner", (self._system("planner", tenant), question))
        executor_prompt: tuple[Segment, ...] = (self._system("worker", tenant), question, Output(plan))
        critic_prompt: tuple[Segment, ...] = (self._system("critic", tenant), question, Output(plan))
        parent, retries = plan, 0
        while True:
            execute = self._add(calls, rng, "worker", executor_prompt, parents=(parent,), tool=True)
            tool_result = Text(f"{job_id}/tool{retries}", self._length(rng, self.tool_tokens_mean))
            critic_prompt = (*critic_prompt, Output(execute), tool_result)
            parent = self._add(calls, rng, "critic", critic_prompt, parents=(execute,))
            executor_prompt = (*executor_prompt, Output(execute), tool_result, Output(parent))
            critic_prompt = (*critic_prompt, Output(parent))
            # A retry's critic reads the new executor prompt + its output + its tool result.
            retry_tokens = (
                _prompt_tokens(calls, executor_prompt) + self.max_tokens + self._cap(self.tool_tokens_mean)
            )
            rejected = rng.random() < self.reject_prob
            if (
                not rejected
                or retries == self.max_retries
                or retry_tokens + self.max_tokens > self.max_context_tokens
            ):
                break
            retries += 1
        return self._job(job_id, arrival_s, calls, tenant, retries=retries)


@dataclass
class Debate(AgentGenerator):
    """``num_agents`` debaters x ``num_rounds`` rounds, then a judge.

    In round j every debater sees the question and all answers of rounds < j (strong context
    inflation); each round's prompt extends the previous round's. The judge sees every answer.
    """

    name: ClassVar[str] = "debate"

    num_agents: int = 3
    """Debaters per round."""
    num_rounds: int = 3
    """Rounds of answers before the judge."""

    def _check_structure(self) -> None:
        for name in ("num_agents", "num_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Debate.{name} must be an int >= 1, got {value!r}")

    def _worst_prompt_tokens(self) -> int:  # the judge reads every answer
        return super()._worst_prompt_tokens() + self.num_agents * self.num_rounds * self.max_tokens

    def sample(self, rng: np.random.Generator, job_id: str, arrival_s: float, tenant: str = "default") -> Job:
        calls: list[Call] = []
        question = Text(f"{job_id}/input", self._length(rng, self.input_tokens_mean))
        prompt: tuple[Segment, ...] = (self._system("debater", tenant), question)
        previous: list[int] = []
        for _ in range(self.num_rounds):
            previous = [
                self._add(calls, rng, "debater", prompt, parents=previous) for _ in range(self.num_agents)
            ]
            prompt = (*prompt, *(Output(c) for c in previous))
        judge_prompt = (self._system("aggregator", tenant), question, *prompt[2:])
        self._add(calls, rng, "aggregator", judge_prompt, parents=previous)
        return self._job(job_id, arrival_s, calls, tenant)


@dataclass
class TreeOfThoughts(AgentGenerator):
    """Tree of thoughts: ``branching`` thoughts per expanded node, ``depth`` levels, and the best
    ``keep`` nodes of each level expanded (the rest pruned: no children); an aggregator reads the
    kept leaves. A child's prompt is its parent's + ``Output(parent)``: the path is a prefix.
    """

    name: ClassVar[str] = "tree_of_thoughts"

    branching: int = 3
    """Thoughts proposed per expanded node (and at the first level)."""
    depth: int = 3
    """Levels of thoughts."""
    keep: int = 2
    """Nodes kept per level (ToT's breadth limit); the others are pruned."""

    def _check_structure(self) -> None:
        for name in ("branching", "depth", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TreeOfThoughts.{name} must be an int >= 1, got {value!r}")
        if self.keep > self.branching:
            raise ValueError(f"TreeOfThoughts.keep ({self.keep}) must be <= branching ({self.branching})")

    def _worst_prompt_tokens(self) -> int:  # a deepest thought's path, or the aggregator's leaves
        return super()._worst_prompt_tokens() + max(self.depth - 1, self.keep) * self.max_tokens

    def sample(self, rng: np.random.Generator, job_id: str, arrival_s: float, tenant: str = "default") -> Job:
        calls: list[Call] = []
        question = Text(f"{job_id}/input", self._length(rng, self.input_tokens_mean))
        root: tuple[Segment, ...] = (self._system("thinker", tenant), question)
        level = [self._add(calls, rng, "thinker", root) for _ in range(self.branching)]
        pruned: list[int] = []
        for lvl in range(self.depth):
            scores = rng.random(len(level))  # stands in for ToT's value prompt
            kept = sorted(level[i] for i in np.argsort(-scores, kind="stable")[: self.keep])
            pruned += [c for c in level if c not in kept]
            if lvl == self.depth - 1:
                break
            level = [
                self._add(calls, rng, "thinker", (*calls[n].prompt, Output(n)), parents=(n,))
                for n in kept
                for _ in range(self.branching)
            ]
        aggregator_prompt: tuple[Segment, ...] = (
            self._system("aggregator", tenant),
            question,
            *(Output(n) for n in kept),
        )
        self._add(calls, rng, "aggregator", aggregator_prompt, parents=kept)
        return self._job(job_id, arrival_s, calls, tenant, pruned=pruned)


def _default_mix() -> list[tuple[Generator, float, str]]:
    return [(ReactChain(), 1.0, "a"), (MapReduce(), 1.0, "b"), (PlanExecuteCritique(), 1.0, "c")]


@dataclass
class Mixed:
    """A multi-tenant mixture: each job picks an entry (generator, weight, tenant) by weight and
    takes that entry's tenant (the ``tenant`` argument is ignored) and generator name as kind."""

    name: ClassVar[str] = "mixed"

    entries: list[tuple[Generator, float, str]] = field(default_factory=_default_mix)
    """(generator, weight, tenant) triples; weights need not sum to 1."""

    def __post_init__(self) -> None:
        entries: list[tuple[Any, ...]] = [tuple(entry) for entry in self.entries]  # Hydra hands over lists
        if not entries or any(len(entry) != 3 for entry in entries):
            raise ValueError("Mixed.entries must be a non-empty list of (generator, weight, tenant) triples")
        self.entries = [(generator, weight, tenant) for generator, weight, tenant in entries]
        weights = np.array([float(weight) for _, weight, _ in self.entries])
        if np.any(weights < 0) or not weights.sum() > 0:
            raise ValueError(
                f"Mixed.entries weights must be >= 0 with a positive sum, got {weights.tolist()}"
            )
        self._probs = weights / weights.sum()
        system_tokens: dict[str, int] = {}
        for generator, _, tenant in self.entries:
            if not callable(getattr(generator, "sample", None)):
                raise ValueError(f"Mixed.entries: {generator!r} has no sample() method")
            if isinstance(generator, AgentGenerator):
                key = generator._system_key("*", tenant)
                if system_tokens.setdefault(key, generator.system_tokens) != generator.system_tokens:
                    raise ValueError(
                        f"Mixed.entries: two {generator.name!r} entries share system prompts ({key}) but set "
                        "different system_tokens; make them equal or set system_per_tenant with distinct tenants"
                    )

    def sample(self, rng: np.random.Generator, job_id: str, arrival_s: float, tenant: str = "default") -> Job:
        generator, _, entry_tenant = self.entries[int(rng.choice(len(self.entries), p=self._probs))]
        return generator.sample(rng, job_id, arrival_s, tenant=entry_tenant)


GENERATORS: dict[str, type] = {
    cls.name: cls for cls in (ReactChain, MapReduce, PlanExecuteCritique, Debate, TreeOfThoughts, Mixed)
}
"""Generator classes by their ``name`` (the Job ``kind`` they produce)."""
