"""FCFS vs the exported policy vs program-FCFS vs the priority route in real vLLM (CPU build, the
tests' tiny random Llama), in-process (engine steps, deterministic) and through vLLM's OpenAI
server (wall time, via agents/replay), on map-reduce and debate trees; alternating rounds.

Run in the vLLM venv (scripts/setup_vllm.sh):
    .venv-vllm/bin/python scripts/bench_vllm_replay.py --policy run/policy.onnx --out scripts/results/replay_vllm.md

In-process: trees arrive every ``--gap-steps`` engine steps; a call is submitted when its parents
finished (no tool pauses), its prompt built by agents/replay's PromptBuilder from its parents' real
outputs, tagged per the adapter's convention; tree time = engine steps from arrival to its last
call's finish. Server: the same trees replayed over HTTP (``--gap-s`` apart), one server start per
policy per round; tree time in seconds."""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SCHEDULER = "servegym.agents.deploy.vllm_adapter.ServegymScheduler"
DEFAULT_HORIZON_S = 0.2  # servegym.agents.deploy.vllm_adapter.DEFAULT_HORIZON_S (vLLM-free import kept lazy)
MODES = ("fcfs", "servegym", "program_fcfs", "priority")
ENGINE = {"max_num_seqs": 8, "num_gpu_blocks_override": 40, "block_size": 32}
SIZES = {
    "system_tokens": 32,
    "input_tokens_mean": 32.0,
    "output_tokens_mean": 16.0,
    "max_tokens": 24,
    "max_context_tokens": 500,
}


def workloads(num_trees: int, seed: int = 0) -> dict[str, list]:
    from servegym.envs.workloads.generators import Debate, MapReduce

    rng = np.random.default_rng(seed)
    return {
        "mapreduce": [MapReduce(fan_out=4, **SIZES).sample(rng, f"m{i}", float(i)) for i in range(num_trees)],
        "debate": [
            Debate(num_agents=2, num_rounds=2, **SIZES).sample(rng, f"d{i}", float(i))
            for i in range(num_trees)
        ],
    }


def tiny_llama(path: Path) -> Path:
    from servegym.agents.replay.vllm_server import write_tiny_llama

    return write_tiny_llama(path)


def policy_env(mode: str, policy: str) -> dict[str, str]:
    if mode == "servegym":
        return {"SERVEGYM_POLICY": policy}
    if mode == "program_fcfs":
        return {"SERVEGYM_POLICY": "servegym.agents.policies.heuristics:ProgramFCFS"}
    return {}


def in_process(
    model: Path, mode: str, policy: str, jobs: list, gap_steps: int, horizon_s: float = DEFAULT_HORIZON_S
) -> dict:
    """One engine run; per-tree steps and wall seconds."""
    from vllm import LLM, SamplingParams

    from servegym.agents.deploy.vllm_adapter import (
        DEFAULT_STEP_S,
        TREE_TAG_KEY,
        PendingRequest,
        PriorityRoute,
        TreeTag,
    )
    from servegym.agents.replay.prompts import PromptBuilder

    os.environ.pop("SERVEGYM_POLICY", None)
    os.environ.update(policy_env(mode, policy))
    kwargs = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "seed": 0, **ENGINE}
    if mode in ("servegym", "program_fcfs"):
        kwargs["scheduler_cls"] = SCHEDULER
    if mode == "priority":
        kwargs["scheduling_policy"] = "priority"
    llm = LLM(model=str(model), **kwargs)
    engine = llm.llm_engine
    step = 0
    route = (
        PriorityRoute(policy, horizon_s, clock=lambda: step * DEFAULT_STEP_S) if mode == "priority" else None
    )
    builder = PromptBuilder(1000)
    arrivals = {job.job_id: i * gap_steps for i, job in enumerate(jobs)}
    state = {job.job_id: {"outputs": {}, "left": len(job.calls), "sent": set()} for job in jobs}
    by_id = {job.job_id: job for job in jobs}
    finish_step, start_wall, finish_wall = {}, {}, {}
    t0 = time.perf_counter()
    next_arrival = 0

    def submit_ready(job) -> None:
        s = state[job.job_id]
        depths = job.depth()
        for call in job.calls:
            if call.call_id in s["sent"] or any(p not in s["outputs"] for p in call.parents):
                continue
            s["sent"].add(call.call_id)
            tag = TreeTag(job.job_id, call.call_id, call.role, depths[call.call_id]).encode()
            prompt = builder.prompt(job, call.call_id, s["outputs"])
            params = SamplingParams(
                max_tokens=call.generated_tokens,
                ignore_eos=True,
                temperature=0.0,
                extra_args={TREE_TAG_KEY: tag},
            )
            priority = 0
            if route is not None:
                (priority,) = route.priorities(
                    [PendingRequest(len(prompt.split()), call.generated_tokens, tag)]
                )
            engine.add_request(tag, prompt, params, priority=priority)

    while next_arrival < len(jobs) or engine.has_unfinished_requests():
        while next_arrival < len(jobs) and arrivals[jobs[next_arrival].job_id] <= step:
            job = jobs[next_arrival]
            start_wall[job.job_id] = time.perf_counter()
            submit_ready(job)
            next_arrival += 1
        if not engine.has_unfinished_requests():
            step = arrivals[jobs[next_arrival].job_id]  # idle until the next tree
            continue
        outputs = engine.step()
        step += 1
        for out in outputs:
            if not out.finished:
                continue
            job_id, call_id = out.request_id.split(":")[:2]
            s = state[job_id]
            s["outputs"][int(call_id)] = out.outputs[0].text
            s["left"] -= 1
            if route is not None:
                route.finish(
                    PendingRequest(1, 1, out.request_id, num_output_tokens=len(out.outputs[0].token_ids))
                )
            if s["left"] == 0:
                finish_step[job_id] = step
                finish_wall[job_id] = time.perf_counter()
            else:
                submit_ready(by_id[job_id])
    wall_s = time.perf_counter() - t0
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    steps = np.array([finish_step[j.job_id] - arrivals[j.job_id] for j in jobs], dtype=float)
    walls = np.array([finish_wall[j.job_id] - start_wall[j.job_id] for j in jobs])
    return {"steps": steps, "walls": walls, "wall_s": wall_s, "makespan_steps": max(finish_step.values())}


def served(
    model: Path, mode: str, policy: str, workloads_: dict[str, list], gap_s: float, work: Path
) -> dict:
    """One server start; each workload replayed through it in turn."""
    import dataclasses

    from servegym.agents.replay.vllm_server import free_port, running_server, serve_command

    port = free_port()
    args = [
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--served-model-name",
        "tiny",
        "--seed",
        "0",
    ]
    args += [
        "--max-num-seqs",
        str(ENGINE["max_num_seqs"]),
        "--num-gpu-blocks-override",
        str(ENGINE["num_gpu_blocks_override"]),
        "--block-size",
        str(ENGINE["block_size"]),
    ]
    if mode == "priority":
        args += ["--scheduling-policy", "priority"]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        **policy_env(mode, policy),
    }
    command = serve_command(model, port, scheduler=mode in ("servegym", "program_fcfs"), extra_args=args)
    results = {}
    with running_server(command, port, env, work / f"server_{mode}.log") as url:
        for name, jobs in workloads_.items():
            timed = [dataclasses.replace(job, arrival_s=i * gap_s) for i, job in enumerate(jobs)]
            results[name] = _replay_one(url, mode, policy, timed)
    return results


def _replay_one(url: str, mode: str, policy: str, timed: list) -> dict:
    from servegym.agents.replay import ReplayConfig, jobs_frame, replay
    from servegym.envs.workloads.source import FixedJobs

    config = ReplayConfig(
        base_url=url,
        model="tiny",
        label=mode,
        max_connections=64,
        request_timeout_s=120,
        tool_time_scale=0.0,
        priority_policy=policy if mode == "priority" else None,
    )
    result = replay(FixedJobs(timed), config)
    trees = jobs_frame(result)
    if trees.failed.any():
        raise RuntimeError(f"{mode}: {int(trees.failed.sum())} trees failed")
    return {"walls": trees.jct_s.to_numpy(), "wall_s": result.wall_s}


def p99(values: np.ndarray) -> float:
    return float(np.percentile(values, 99))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", required=True, help="exported policy.onnx (its policy.json beside it)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trees", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gap-steps", type=int, default=6)
    parser.add_argument("--gap-s", type=float, default=0.05)
    parser.add_argument("--server-rounds", type=int, default=1)
    parser.add_argument("--server-first-round", type=int, default=0, help="rotation of the policy order")
    parser.add_argument("--seed", type=int, default=0, help="tree contents (generator seed)")
    args = parser.parse_args()
    os.environ.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        }
    )
    work = Path(tempfile.mkdtemp(prefix="bench_replay_"))
    os.environ["VLLM_CACHE_ROOT"] = str(work / "cache")
    model = tiny_llama(work / "tiny")
    trees = workloads(args.trees, args.seed)
    lines = [
        f"# vLLM replay: {args.trees} trees per run (seed {args.seed}), policy {args.policy}",
        "",
        f"Engine: {ENGINE}, tiny random Llama (2 layers), vLLM 0.32.0 CPU build, 2 shared cores.",
        "",
    ]
    rows: dict[tuple, list] = {}
    start = time.perf_counter()
    for r in range(args.rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for name, jobs in trees.items():
            for mode in order:
                result = in_process(model, mode, args.policy, jobs, args.gap_steps)
                rows.setdefault(("in-process", name, mode), []).append(result)
                print(
                    f"round {r} {name} {mode}: mean {result['steps'].mean():.1f} steps, p99 {p99(result['steps']):.0f}, makespan {result['makespan_steps']}, wall {result['wall_s']:.1f} s",
                    flush=True,
                )
    identical = None  # the exported policy run again: per-tree steps equal to its round-0 run?
    if args.rounds:
        repeat = in_process(model, "servegym", args.policy, trees["mapreduce"], args.gap_steps)
        identical = bool(
            np.array_equal(repeat["steps"], rows[("in-process", "mapreduce", "servegym")][0]["steps"])
        )
    for r in range(args.server_first_round, args.server_first_round + args.server_rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for mode in order:
            try:
                by_workload = served(model, mode, args.policy, trees, args.gap_s, work)
            except RuntimeError as error:
                print(f"server {mode}: {error}", flush=True)
                continue
            for name, result in by_workload.items():
                rows.setdefault(("server", name, mode), []).append(result)
                print(
                    f"server round {r} {name} {mode}: mean {result['walls'].mean():.3f} s, p99 {p99(result['walls']):.3f} s, wall {result['wall_s']:.1f} s",
                    flush=True,
                )
    lines += ["## In-process (engine steps; tree time = steps from arrival to its last call)", ""]
    lines += [
        "| workload | policy | rounds | tree steps mean (per round) | / FCFS | p99 steps (per round) | makespan steps | tree wall mean (s) | run wall (s) |",
        "|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for (where, name, mode), results in rows.items():
        if where != "in-process":
            continue
        base = np.mean([x["steps"].mean() for x in rows[(where, name, "fcfs")]])
        means = [x["steps"].mean() for x in results]
        mean_text = f"{np.mean(means):.1f} ({', '.join(f'{m:.1f}' for m in means)})"
        p99_text = ", ".join(f"{p99(x['steps']):.0f}" for x in results)
        makespan = np.mean([x["makespan_steps"] for x in results])
        tree_wall = np.mean([x["walls"].mean() for x in results])
        run_wall = np.mean([x["wall_s"] for x in results])
        lines.append(
            f"| {name} | {mode} | {len(results)} | {mean_text} | {np.mean(means) / base:.3f} | {p99_text} "
            f"| {makespan:.0f} | {tree_wall:.3f} | {run_wall:.1f} |"
        )
    lines += [
        "",
        f"Exported policy, map-reduce, run again after the rounds: per-tree steps identical to round 0: **{identical}**.",
        "",
    ]
    lines += ["## Through vLLM's OpenAI server (scripts/replay's client; wall seconds)", ""]
    lines += [
        "| workload | policy | runs | tree time mean (s) | / FCFS | tree time p99 (s) | replay wall (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (where, name, mode), results in rows.items():
        if where != "server" or (where, name, "fcfs") not in rows:
            continue
        base = np.mean([x["walls"].mean() for x in rows[(where, name, "fcfs")]])
        mean = np.mean([x["walls"].mean() for x in results])
        lines.append(
            f"| {name} | {mode} | {len(results)} | {mean:.3f} | {mean / base:.3f} | {np.mean([p99(x['walls']) for x in results]):.3f} | {np.mean([x['wall_s'] for x in results]):.1f} |"
        )
    lines += ["", f"Total bench time {time.perf_counter() - start:.0f} s."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
