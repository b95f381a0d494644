"""Golden runs: seeded engine and env trajectories recorded once, replayed by ``test_golden.py``.

Every optimisation of the engine must leave these identical: the same decisions in the same
order at the same virtual times (bit for bit), with the same candidates, masks and features
(to 1e-5), the same integer metrics, and float metrics and rewards to 1e-9 relative. Integrals
over virtual time (tree-seconds, hence rewards; KV use) are sums over events, and folding decode
runs (``Replica.time_batch``) changes how many events there are, so their last bits follow the
order of additions; nothing else may move. A run is summarised by a digest of everything a
policy saw (chunked, so a mismatch names the first diverging stretch), its decision count, its
metrics and, for env rollouts, the reward summed per chunk.

The set spans every workload family, both preemption modes, the swap tier, chunked prefill,
TTL pinning (fixed, tool_mean, oracle), workflow eviction, prefix caching on and off, one,
two and heterogeneous replicas, fast-forward on and off, four kinds of policy, realistic
(llama8b, 16-token blocks) and tiny settings, and random-action rollouts of every env id.

Re-record only in a commit that says why the trajectories changed:

    .venv/bin/python tests/engine/golden.py --record
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `tests.engine...` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from servegym.agents.policies.heuristics import FCFS, ProgramFCFS  # noqa: E402
from servegym.envs.engine.config import ClusterConfig, EngineConfig  # noqa: E402
from servegym.envs.engine.engine import Engine  # noqa: E402
from servegym.envs.engine.policy import Decision, Policy  # noqa: E402
from servegym.envs.workloads.generators import Debate, MapReduce, Mixed, ReactChain  # noqa: E402
from servegym.envs.workloads.workload import Workload  # noqa: E402
from tests.engine.test_engine_invariants import GENERATORS, Scenario, build, make_policy  # noqa: E402

GOLDEN_PATH = Path(__file__).with_name("golden_runs.json")
CHUNK = 64
"""Decisions per digest chunk."""
FEATURE_DECIMALS = 5
"""Features enter the digest rounded: a change past 1e-5 is a real change, a last-ulp
difference of a transcendental function between CPUs is not."""


class DigestRecorder:
    """Wraps a policy; digests what it is shown and what it answers, CHUNK decisions at a time."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.retention = getattr(policy, "retention", None)
        self.chunks: list[str] = []
        self.count = 0
        self._hash = hashlib.sha256()

    def scores(self, decision: Decision) -> np.ndarray:
        scores = np.asarray(self.policy.scores(decision), dtype=np.float64)
        update_decision(self._hash, decision)
        self._hash.update(scores.tobytes())
        self.count += 1
        if self.count % CHUNK == 0:
            self.chunks.append(self._hash.hexdigest()[:16])
        return scores

    def finish(self) -> list[str]:
        return [*self.chunks, self._hash.hexdigest()[:16]]


def update_decision(h: Any, decision: Decision) -> None:
    h.update(np.array([int(decision.kind), decision.replica, decision.call], dtype=np.int64).tobytes())
    h.update(np.float64(decision.now_s).tobytes())
    h.update(np.ascontiguousarray(decision.candidates, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(decision.mask, dtype=bool).tobytes())
    for table in (decision.features, decision.global_features, decision.privileged):
        h.update(np.round(np.asarray(table, dtype=np.float64), FEATURE_DECIMALS).tobytes())


def metrics_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as JSON: floats by repr (exact), NaN as the string 'nan'."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not np.isfinite(value):
            value = repr(value)
        out[key] = value
    return out


# ---------------------------------------------------------------- engine runs
_CHOICES = dict(
    arrival=["poisson", "gamma", "closed"],
    arrival_rate=[5.0, 100.0, 1000.0],
    replicas=["1", "1", "2", "hetero"],
    block_size=[4, 8, 16],
    kv_slack=[1.0, 1.3, 2.0, 50.0],
    max_num_batched_tokens=[24, 64, 8192],
    max_num_seqs=[3, 256],
    long_prefill_token_threshold=[0, 0, 12],
    preemption_mode=["recompute", "swap"],
    swap_blocks=[0, 8, 10_000],
    prefix_caching=[True, True, False],
    network_delay_s=[0.0, 0.003],
    policy=["fcfs", "random", "lifo", "linear"],
    fast_forward=[True, True, False],
    pin_ttl_rule=["off", "fixed", "tool_mean", "oracle"],
    prefix_eviction=["lru", "workflow"],
)


def tiny_scenarios(count: int = 36, seed: int = 2026) -> list[Scenario]:
    """Tiny-profile scenarios (the invariant tests' space), every family six times, the other
    settings drawn from a seeded generator so they combine widely."""
    rng = np.random.default_rng(seed)
    families = sorted(GENERATORS)
    out = []
    for i in range(count):
        pick = {k: v[int(rng.integers(len(v)))] for k, v in _CHOICES.items()}
        out.append(
            Scenario(
                generator=families[i % len(families)],
                seed=int(rng.integers(2**31)),
                num_jobs=int(rng.integers(4, 13)),
                policy_seed=int(rng.integers(2**16)),
                **pick,
            )
        )
    return out


def realistic_engines() -> dict[str, tuple[Workload, ClusterConfig, EngineConfig, str]]:
    """Default-sized settings (llama8b profile, 16-token blocks) where queues and KV pressure
    build up: the regime the benchmarks time."""
    mr = MapReduce()
    return {
        "mapreduce_queue": (
            Workload(generator=mr, arrival_rate=8.0, num_jobs=40),
            ClusterConfig(),
            EngineConfig(max_num_seqs=32),
            "program_fcfs",
        ),
        "mapreduce_tight_kv": (
            Workload(generator=mr, arrival_rate=8.0, num_jobs=30),
            ClusterConfig(),
            EngineConfig(num_gpu_blocks=900, max_num_seqs=64),
            "linear",
        ),
        "react_swap_pins": (
            Workload(generator=ReactChain(), arrival_rate=4.0, num_jobs=30),
            ClusterConfig(network_delay_s=0.002),
            EngineConfig(
                num_gpu_blocks=1200,
                preemption_mode="swap",
                swap_space_bytes=2e9,
                pin_ttl_rule="tool_mean",
                pin_ttl_s=0.5,
                prefix_eviction="workflow",
            ),
            "random",
        ),
        "mixed_two_replicas": (
            Workload(
                generator=Mixed(entries=[(ReactChain(), 1.0, "a"), (mr, 1.0, "b"), (Debate(), 1.0, "c")]),
                arrival_rate=6.0,
                num_jobs=30,
            ),
            ClusterConfig(num_replicas=2),
            EngineConfig(num_gpu_blocks=1500, max_num_seqs=48, long_prefill_token_threshold=512),
            "linear",
        ),
    }


def _policy(name: str, seed: int) -> Policy:
    if name == "program_fcfs":
        return ProgramFCFS()
    return make_policy(name, seed) if name != "fcfs" else FCFS()


def run_engine(engine: Engine, policy: Policy) -> dict[str, Any]:
    recorder = DigestRecorder(policy)
    metrics = engine.run(recorder)
    return {
        "decisions": recorder.count,
        "digests": recorder.finish(),
        "metrics": metrics_record(asdict(metrics)),
    }


def engine_runs() -> dict[str, Any]:
    """name -> a zero-argument function returning the run's record."""
    runs: dict[str, Any] = {}
    for i, sc in enumerate(tiny_scenarios()):
        runs[f"tiny_{i:02d}_{sc.generator}"] = lambda sc=sc: run_engine(
            build(sc), make_policy(sc.policy, sc.policy_seed)
        )
    for name, (workload, cluster, config, policy) in realistic_engines().items():

        def go(workload=workload, cluster=cluster, config=config, policy=policy) -> dict[str, Any]:
            return run_engine(Engine(workload.build(7), cluster, config), _policy(policy, 7))

        runs[name] = go
    return runs


# ---------------------------------------------------------------- env rollouts
ENV_STEPS = 400
GOLDEN_ENV_IDS = (
    "servegym/Scheduling-v0",
    "servegym/Eviction-v0",
    "servegym/Routing-v0",
    "servegym/Serving-v0",
    "servegym/PickNext-v0",
)
"""The ids recorded (a later version is a new id and joins in its own commit)."""


def env_rollout(env_id: str, kwargs: dict[str, Any], steps: int = ENV_STEPS, seed: int = 3) -> dict[str, Any]:
    """Random actions (``tests.envs.small.random_action``) for ``steps`` steps, resets included:
    a digest of every observation, reward, end flag and action, and the metrics of each episode."""
    import gymnasium as gym

    import servegym.envs  # noqa: F401  (registers the ids)
    from tests.envs.small import random_action

    env = gym.make(env_id, **kwargs)
    rng = np.random.default_rng(seed)
    h = hashlib.sha256()
    obs, _ = env.reset(seed=seed)
    episodes: list[dict[str, Any]] = []
    chunks: list[str] = []
    rewards: list[float] = []  # per chunk: compared to 1e-9, not digested (see module docstring)
    reward_sum = 0.0
    for step in range(1, steps + 1):
        for key in sorted(obs):
            h.update(np.round(obs[key].astype(np.float64), FEATURE_DECIMALS).tobytes())
        action = random_action(env, rng)
        h.update(np.asarray(action, dtype=np.float64).tobytes())
        obs, reward, terminated, truncated, info = env.step(action)
        h.update(np.array([terminated, truncated], dtype=np.int64).tobytes())
        reward_sum += reward
        if step % CHUNK == 0:
            chunks.append(h.hexdigest()[:16])
            rewards.append(reward_sum)
            reward_sum = 0.0
        if terminated or truncated:
            episodes.append(metrics_record(info["metrics"]))
            obs, _ = env.reset()
    env.close()
    return {
        "decisions": steps,
        "digests": [*chunks, h.hexdigest()[:16]],
        "rewards": [*rewards, reward_sum],
        "episodes": episodes,
    }


def env_runs() -> dict[str, Any]:
    from tests.envs.small import small_kwargs

    runs: dict[str, Any] = {}
    for env_id in GOLDEN_ENV_IDS:
        short = env_id.split("/")[-1]
        runs[f"env_small_{short}"] = lambda env_id=env_id: env_rollout(env_id, small_kwargs(env_id))
        runs[f"env_default_{short}"] = lambda env_id=env_id: env_rollout(env_id, {}, steps=250)
    return runs


def all_runs() -> dict[str, Any]:
    return {**engine_runs(), **env_runs()}


def record(path: Path = GOLDEN_PATH) -> None:
    results = {name: run() for name, run in all_runs().items()}
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    total = sum(r["decisions"] for r in results.values())
    print(f"recorded {len(results)} golden runs ({total} decisions/steps) to {path}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    record()
