"""The torch backend: the engine runs a real (tiny) model over its real paged KV cache.

* every logit row the engine sampled from equals a plain full-sequence forward of the same model
  over the call's tokens (prompt, then its own outputs), through chunked prefill, decodes, prefix
  hits and preemptions by swap and by recompute (fp32 on CPU: max abs diff <= 1e-4);
* the run drains: every call completes once, no block leaks, the block pool is whole;
* a child's ``Output(parent)`` tokens are the parent's generated tokens;
* with the cost model's clock the trajectory is the sim backend's, bit for bit, and repeatable;
* config errors name what is wrong.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from servegym.agents.policies.heuristics import FCFS
from servegym.envs.engine.calls import CallState
from servegym.envs.engine.config import ClusterConfig, EngineConfig, Outage
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.engine.torch_backend import TorchBackend, TorchBackendFactory
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.job import Output
from servegym.envs.workloads.workload import Workload

LOGIT_ATOL = 1e-4  # fp32 on CPU; observed ~1e-6
RUN_LIMIT_S = 60


def workload(num_jobs: int = 4, seed: int = 7):
    generator = MapReduce(
        fan_out=3,
        system_tokens=16,
        input_tokens_mean=20.0,
        tool_tokens_mean=8.0,
        output_tokens_mean=16.0,
        max_tokens=20,
        max_context_tokens=240,
    )
    return Workload(generator=generator, arrival_rate=1e4, num_jobs=num_jobs).build(seed)


def config(mode: str = "recompute", **overrides) -> EngineConfig:
    """Tight KV (preemption happens), small chunks (prefills span iterations), tiny blocks."""
    settings = dict(
        profile="tiny_cpu",
        block_size=4,
        num_gpu_blocks=64,  # the largest call needs 60
        max_num_batched_tokens=32,
        preemption_mode=mode,
        swap_space_bytes=1e7,
    )
    return EngineConfig(**{**settings, **overrides})


def run(cfg: EngineConfig, time_limit, timing: str = "cost_model", record: bool = False):
    factory = TorchBackendFactory(cfg, device="cpu", timing=timing, record_logits=record)
    engine = Engine(workload(), engine=cfg, backend_factory=factory)
    with time_limit(RUN_LIMIT_S):
        metrics = engine.run(FCFS())
    return engine, metrics, factory


def check_drained(engine: Engine, metrics) -> None:
    assert not metrics.stalled, metrics.stall_reason
    assert_all_terminal(engine)
    calls, n = engine.calls, engine.calls.size
    assert (calls.state[:n] == CallState.FINISHED).all()
    assert engine.job_table.calls_done[: len(engine.jobs)].tolist() == [len(job.calls) for job in engine.jobs]
    assert (calls.num_output[:n] == calls.target_tokens[:n]).all()
    for replica in engine.replicas:
        bm = replica.blocks
        bm.check_invariants()
        assert bm.num_free_blocks == bm.num_blocks and bm.num_host_used_blocks == 0
        assert not replica.backend.host_kv  # every swapped call came back


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_sampled_logits_equal_a_full_forward(mode: str, time_limit) -> None:
    engine, metrics, factory = run(config(mode), time_limit, record=True)
    check_drained(engine, metrics)
    backend: TorchBackend = engine.replicas[0].backend
    # the run exercised what it claims to: chunked prefill, prefix hits, preemption of each kind
    assert metrics.preemptions > 0 and metrics.prefix_hit_rate > 0
    assert engine.calls.prompt_tokens[: engine.calls.size].max() > engine.config.max_num_batched_tokens
    if mode == "swap":
        assert backend.num_swapped_in_blocks > 0 and metrics.recomputed_tokens == 0
    else:
        assert metrics.recomputed_tokens > 0 and backend.num_swapped_out_blocks == 0
    calls, store, model = engine.calls, factory.tokens, backend.model
    worst = 0.0
    for call in range(calls.size):
        prompt = store.prompt(call, calls.segments[call])
        outputs = store.outputs[call]
        assert len(outputs) == calls.num_output[call]
        sequence = torch.from_numpy(np.concatenate([prompt, outputs]))
        with torch.inference_mode():
            full = model(sequence[:-1])  # (T - 1, vocab): the last output is never an input
        recorded = backend.logits[call]
        assert [ctx for ctx, _ in recorded] == list(range(len(prompt), len(sequence)))
        for (ctx, logits), token in zip(recorded, outputs, strict=True):
            worst = max(worst, float(np.abs(logits - full[ctx - 1].numpy()).max()))
            assert token == int(np.argmax(logits))  # greedy
    assert worst <= LOGIT_ATOL, f"paged vs full logits differ by {worst:.2e}"


def test_child_prompt_holds_its_parents_outputs(time_limit) -> None:
    engine, metrics, factory = run(config(), time_limit)
    check_drained(engine, metrics)
    store, calls = factory.tokens, engine.calls
    checked = 0
    for index, job in enumerate(engine.jobs):
        base = engine.job_table.first_call[index]
        for spec in job.calls:
            call, pos = base + spec.call_id, 0
            prompt = store.prompt(call, calls.segments[call])
            for seg in spec.prompt:
                length = int(calls.num_output[base + seg.call]) if isinstance(seg, Output) else seg.num_tokens
                if isinstance(seg, Output):
                    assert prompt[pos : pos + length].tolist() == store.outputs[base + seg.call]
                    checked += 1
                pos += length
            assert pos == len(prompt) == calls.prompt_tokens[call]
    assert checked > 0


def test_cost_model_clock_gives_the_sim_trajectory_bit_for_bit(time_limit) -> None:
    cfg = config("swap")
    a, metrics_a, factory_a = run(cfg, time_limit)
    b, metrics_b, factory_b = run(cfg, time_limit)
    sim = Engine(workload(), engine=replace(cfg, fast_forward=False))  # stepped, as the torch backend
    with time_limit(RUN_LIMIT_S):
        metrics_sim = sim.run(FCFS())
    assert repr(metrics_a.as_dict()) == repr(metrics_b.as_dict()) == repr(metrics_sim.as_dict())  # NaN-safe
    n = a.calls.size
    for column in ("finish_s", "first_token_s", "num_preemptions", "num_output"):
        assert np.array_equal(getattr(a.calls, column)[:n], getattr(sim.calls, column)[:n])
    assert factory_a.tokens.outputs == factory_b.tokens.outputs  # same model, same tokens


def test_config_backend_torch_measures_real_time(time_limit) -> None:
    cfg = config(backend="torch")
    engine = Engine(workload(num_jobs=2), engine=cfg)  # the backend comes from the config
    with time_limit(RUN_LIMIT_S):
        metrics = engine.run(FCFS())
    check_drained(engine, metrics)
    assert isinstance(engine.replicas[0].backend, TorchBackend)
    assert engine.replicas[0].backend.runner.kv_cache.shape[2] == cfg.num_gpu_blocks
    assert 0 < metrics.makespan_s < 60  # measured wall time of a few hundred tiny iterations
    assert torch.get_num_threads() == cfg.torch_threads


def test_config_torch_timing_cost_model_runs_the_model_on_the_sims_clock(time_limit) -> None:
    cfg = config(backend="torch", torch_timing="cost_model")
    engine = Engine(workload(num_jobs=2), engine=cfg)  # backend and timing both from the config
    # stepped like the torch backend: fast-forward sums kv_utilization_mean in another order (1e-9)
    sim = Engine(workload(num_jobs=2), engine=config(fast_forward=False))
    with time_limit(RUN_LIMIT_S):
        metrics, metrics_sim = engine.run(FCFS()), sim.run(FCFS())
    check_drained(engine, metrics)
    assert engine.replicas[0].backend.timing == "cost_model"
    assert repr(metrics.as_dict()) == repr(metrics_sim.as_dict())


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"engine.backend must be one of \('sim', 'torch'\), got 'jax'"):
        EngineConfig(backend="jax")
    with pytest.raises(ValueError, match=r"engine.torch_timing must be one of .*got 'wall'"):
        EngineConfig(torch_timing="wall")
    with pytest.raises(ValueError, match="engine.torch_threads"):
        EngineConfig(torch_threads=0)


def test_unknown_model_or_mismatched_profile_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        Engine(workload(1), engine=config(backend="torch", model="gpt5"))
    with pytest.raises(ValueError, match="needs a model for profile 'llama8b_h100'"):
        Engine(workload(1), engine=EngineConfig(backend="torch", profile="llama8b_h100"))
    with pytest.raises(ValueError, match="cost profile 'tiny_cpu' describes"):
        Engine(workload(1), engine=config(backend="torch", model="llama1b"))


def test_recorded_iterations_are_the_clock_and_the_cost_model_fits_them_exactly(time_limit) -> None:
    """Calibration fits on what a running engine recorded: one record per iteration, its time the
    clock's step; on the cost model's clock the profile predicts every record exactly."""
    from servegym.envs.engine import calibration as cal

    cfg = config("recompute")
    factory = TorchBackendFactory(cfg, device="cpu", timing="cost_model", record_iterations=True)
    engine = Engine(workload(), engine=cfg, backend_factory=factory)
    with time_limit(RUN_LIMIT_S):
        metrics = engine.run(FCFS())
    (backend,) = factory.backends
    iterations = backend.iterations
    assert len(iterations) == metrics.iterations > 0
    assert {it.kind for it in iterations} >= {"decode (eager)", "mixed"}  # no graphs on a CPU
    assert all((it.num_seqs > it.decode_seqs) == (it.prefill_tokens > 0) for it in iterations)
    rows = {r["kind"]: r for r in cal.breakdown(backend.profile, iterations)}
    assert rows["all"]["n"] == len(iterations)
    assert rows["all"]["measured_s"] == pytest.approx(sum(it.time_s for it in iterations))
    assert rows["all"]["mape_pct"] == pytest.approx(0.0, abs=1e-9)
    assert len(cal.engine_points(iterations)) == len(iterations)
    worst = cal.outliers(backend.profile, iterations, k=3)[0]
    assert worst["measured_s"] == pytest.approx(worst["predicted_s"])


def test_kernel_warm_up_writes_nothing() -> None:
    from servegym.envs.engine.model import LlamaModel, model_config
    from servegym.envs.engine.torch_backend import ModelRunner

    runner = ModelRunner(LlamaModel(model_config("tiny")), num_blocks=32, block_size=16, cuda_graphs=False)
    runner.kv_cache.normal_()
    before = runner.kv_cache.clone()
    runner._compile_kernels()
    assert torch.equal(before, runner.kv_cache)


def test_continuations_run_on_real_tokens_and_children_read_the_whole_output(time_limit) -> None:
    """continue_truncated on the torch backend: a continuation's prompt is its stopped call's
    prompt and generated tokens plus the instruction, a child's Output is the chain's tokens in
    order, and the cost-model clock still gives the sim's trajectory bit for bit."""
    cfg = config(continue_truncated=True, continuation_prompt_tokens=3, num_gpu_blocks=96)
    generator = MapReduce(
        fan_out=2, system_tokens=16, input_tokens_mean=20.0, tool_tokens_mean=8.0,
        output_tokens_mean=16.0, max_tokens=6, max_context_tokens=240,
    )  # fmt: skip
    jobs = Workload(generator=generator, arrival_rate=1e4, num_jobs=3).build(5)
    factory = TorchBackendFactory(cfg, device="cpu", timing="cost_model")
    engine = Engine(jobs, engine=cfg, backend_factory=factory)
    sim = Engine(
        Workload(generator=generator, arrival_rate=1e4, num_jobs=3).build(5),
        engine=replace(cfg, fast_forward=False),
    )
    with time_limit(RUN_LIMIT_S):
        metrics, metrics_sim = engine.run(FCFS()), sim.run(FCFS())
    engine.check_invariants()
    assert_all_terminal(engine)
    assert metrics.continuations > 0 and metrics.jobs_completed == 3
    assert repr(metrics.as_dict()) == repr(metrics_sim.as_dict())
    store, calls, trees = factory.tokens, engine.calls, engine.trees
    checked = 0
    for call in range(calls.size):
        source = int(calls.continues[call])
        prompt = store.prompt(call, calls.segments[call])
        if source >= 0:  # its stopped call's tokens, then the instruction
            stopped = np.concatenate([store.prompt(source, calls.segments[source]), store.outputs[source]])
            assert prompt[: len(stopped)].tolist() == stopped.tolist() and len(prompt) == len(stopped) + 3
            continue
        for key, length in calls.segments[call]:
            if key < 0 and trees.last_of(-1 - key) != -1 - key:  # a continued parent's output
                chain, link = [], -1 - key
                while True:
                    chain += store.outputs[link]
                    if trees.last_of(link) == link:
                        break
                    link = trees.continued[link]
                assert length == len(chain) and store.output(-1 - key, length) == chain
                checked += 1
    assert checked > 0


def test_an_outage_on_real_kv_requeues_and_recomputes(time_limit) -> None:
    """Two replicas of the tiny model, one going down mid-run (swap preemption, so some calls
    lose a host copy too): every call completes with the tokens it generates without the
    outage (the lost iteration's tokens are dropped and sampled again), and the cost-model
    clock still gives the sim's trajectory bit for bit."""
    cfg = config("swap")
    cluster = ClusterConfig(num_replicas=2, outages=[Outage(replica=0, start_s=0.02, duration_s=0.05)])
    factory = TorchBackendFactory(cfg, device="cpu", timing="cost_model")
    engine = Engine(workload(num_jobs=6), cluster=cluster, engine=cfg, backend_factory=factory)
    sim = Engine(workload(num_jobs=6), cluster=cluster, engine=replace(cfg, fast_forward=False))
    with time_limit(RUN_LIMIT_S):
        metrics, metrics_sim = engine.run(FCFS()), sim.run(FCFS())
    engine.check_invariants()
    assert_all_terminal(engine)
    assert metrics.requeued_calls > 0 and metrics.jobs_completed == 6
    assert repr(metrics.as_dict()) == repr(metrics_sim.as_dict())
    assert all(not replica.backend.host_kv for replica in engine.replicas)
    # greedy tokens depend only on the context: the run without the outage generates the same ones
    calm = TorchBackendFactory(cfg, device="cpu", timing="cost_model")
    with time_limit(RUN_LIMIT_S):
        Engine(
            workload(num_jobs=6), cluster=ClusterConfig(num_replicas=2), engine=cfg, backend_factory=calm
        ).run(FCFS())
    assert factory.tokens.outputs == calm.tokens.outputs
