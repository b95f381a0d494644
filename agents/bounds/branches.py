"""Forked rollout branches: each candidate answer to the engine's pending decision is applied in
its own ``os.fork`` copy of the interpreter, run ahead, and scored by total tree time. Forking,
not copying, because the generator-based engine cannot be copied in-process; the child reports
through a pipe and leaves with ``os._exit`` so it never runs the parent's atexit handlers."""

from __future__ import annotations

import math
import os
import struct
import sys
import traceback
from collections.abc import Sequence

import numpy as np

from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import Policy


def tree_time_until(engine: Engine, until_s: float = math.inf) -> float:
    """Total tree time (sum over trees of completion - arrival) counted up to ``until_s``:
    each tree contributes min(finish, until) - arrival, unfinished ones until ``until_s``.
    With ``until_s`` = inf on a drained engine this is the total tree time; a tree that
    never finished makes it inf."""
    n = len(engine.jobs)
    arrival = engine.job_arrival_s[:n]  # type: ignore[attr-defined]  # job column (setattr in Engine)
    finish = engine.job_finish_s[:n]  # type: ignore[attr-defined]  # job column (setattr in Engine)
    end = np.minimum(np.where(np.isnan(finish), until_s, finish), until_s)
    return float(np.maximum(end - arrival, 0.0).sum())


def _child(engine: Engine, policy: Policy, scores: np.ndarray, until_s: float, out_fd: int) -> None:
    """The forked branch: apply ``scores``, run ``policy`` to ``until_s``, write the cost."""
    code = 0
    try:
        engine.decide(scores)
        while (decision := engine.next_decision()) is not None and decision.now_s < until_s:
            engine.decide(policy.scores(decision))
        message = b"o" + struct.pack("d", tree_time_until(engine, until_s))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the child's traceback
        message = b"e" + traceback.format_exc().encode()
        code = 1
    try:
        os.write(out_fd, message)
    finally:
        os._exit(code)  # no atexit handlers, no flushing of the parent's buffers


def branch_costs(
    engine: Engine,
    policy: Policy,
    choices: Sequence[np.ndarray],
    until_s: float = math.inf,
    max_parallel: int = 2,
) -> list[float]:
    """For each answer in ``choices`` to the engine's pending decision: fork, apply it in the
    child, run ``policy`` there up to ``until_s`` (virtual; inf: until the workload drains)
    and return the child's ``tree_time_until``. The parent's engine, policy and decision are
    untouched: the generator-based engine cannot be copied in-process, so ``os.fork`` gives
    each branch its own copy of the whole interpreter."""
    if engine.config.backend != "sim":
        raise ValueError("rollouts branch the simulator only (engine.backend=sim)")
    sys.stdout.flush()
    sys.stderr.flush()
    costs: list[float] = [math.nan] * len(choices)
    running: list[tuple[int, int, int]] = []  # (choice index, pid, read fd)

    def reap(entry: tuple[int, int, int]) -> None:
        index, pid, fd = entry
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        os.close(fd)
        os.waitpid(pid, 0)
        data = b"".join(chunks)
        if data[:1] != b"o" or len(data) != 9:
            detail = data[1:].decode(errors="replace") if data[:1] == b"e" else f"no result ({data!r})"
            raise RuntimeError(f"rollout branch {index} failed:\n{detail}")
        costs[index] = struct.unpack("d", data[1:])[0]

    for index, scores in enumerate(choices):
        if len(running) >= max_parallel:
            reap(running.pop(0))
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns
            os.close(read_fd)
            _child(engine, policy, scores, until_s, write_fd)
        os.close(write_fd)
        running.append((index, pid, read_fd))
    for entry in running:
        reap(entry)
    return costs
