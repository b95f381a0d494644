"""The iteration cost model: exact scalar/array agreement, roofline regimes, profiles."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from servegym.envs.engine.cost_model import (
    PROFILES_DIR,
    CostModel,
    available_profiles,
    load_profile,
)


@pytest.fixture(scope="module")
def cm() -> CostModel:
    return CostModel(load_profile("llama8b_h100"))


counts = st.one_of(st.just(0), st.integers(0, 16), st.integers(0, 1 << 22))
rows = st.tuples(
    counts,
    st.one_of(st.just(0.0), st.floats(0, 1e12, allow_nan=False)),
    counts,
    counts,
    st.one_of(st.just(0.0), st.floats(0, 1e10, allow_nan=False)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(rows, min_size=1, max_size=20), st.sampled_from(available_profiles()))
def test_array_matches_scalar_bit_for_bit(batch: list[tuple], name: str) -> None:
    cm = CostModel(load_profile(name))
    columns = [np.array(col, dtype=np.float64) for col in zip(*batch, strict=True)]
    vectorised = cm.iteration_time_s(*columns)
    assert isinstance(vectorised, np.ndarray) and vectorised.dtype == np.float64
    for i, row in enumerate(batch):
        scalar = cm.iteration_time_s(*row)
        assert isinstance(scalar, float)
        assert scalar == vectorised[i]
        assert cm.iteration_time_s(*(np.float64(x) for x in row)) == scalar
        assert cm.iteration_time_s(*(np.asarray(x) for x in row)) == scalar


def test_broadcasts_scalars_against_arrays(cm: CostModel) -> None:
    """The engine's vectorised decode runs pass one growing column and scalars for the rest."""
    kv_read = 64 * 2048 + 64 * np.arange(100, dtype=np.float64)
    times = cm.iteration_time_s(0, 0, 64, kv_read)
    assert times.shape == (100,)
    assert [cm.iteration_time_s(0, 0, 64, float(k)) for k in kv_read] == times.tolist()


@settings(max_examples=60, deadline=None)
@given(rows, st.integers(0, 4), st.floats(1, 1e6, allow_nan=False))
def test_monotone_in_each_argument(cm: CostModel, row: tuple, arg: int, delta: float) -> None:
    bigger = list(row)
    bigger[arg] += delta
    assert cm.iteration_time_s(*bigger) >= cm.iteration_time_s(*row)


def test_more_tokens_take_strictly_longer(cm: CostModel) -> None:
    assert cm.iteration_time_s(0, 0, 2, 4096) > cm.iteration_time_s(0, 0, 1, 2048)
    assert cm.iteration_time_s(4096, 4096 * 2048.5, 0, 0) > cm.iteration_time_s(2048, 2048 * 1024.5, 0, 0)


def test_empty_batch_takes_no_time(cm: CostModel) -> None:
    assert cm.iteration_time_s(0, 0, 0, 0) == 0.0
    assert cm.iteration_time_s(0, 0, 0, 0, 0.0) == 0.0
    assert cm.iteration_time_s(np.zeros(3), 0, 0, 0).tolist() == [0.0, 0.0, 0.0]


def test_decode_batch_one_is_memory_bound(cm: CostModel) -> None:
    p = cm.profile
    weights_s = p.weight_bytes / (p.hbm_bytes_per_s_per_gpu * p.bandwidth_efficiency)
    assert cm.iteration_time_s(0, 0, 1, 1) == pytest.approx(p.overhead_s + weights_s, rel=1e-4)


def test_large_prefill_is_compute_bound(cm: CostModel) -> None:
    p = cm.profile
    tokens, pairs = 8192, 8192 * 8192.5
    flops = 2 * p.num_params * tokens + 4 * p.num_layers * p.num_q_heads * p.head_dim * pairs
    compute_s = flops / (p.peak_flops_per_gpu * p.flops_efficiency)
    memory_s = (p.weight_bytes + p.kv_bytes_per_token * tokens) / (
        p.hbm_bytes_per_s_per_gpu * p.bandwidth_efficiency
    )
    assert compute_s > 5 * memory_s
    assert cm.iteration_time_s(tokens, pairs, 0, 0) == pytest.approx(p.overhead_s + compute_s, rel=1e-12)


def test_swap_adds_bytes_over_host_link(cm: CostModel) -> None:
    swap_s = 1e9 / cm.profile.host_link_bytes_per_s
    assert cm.swap_time_s(1e9) == swap_s
    base = cm.iteration_time_s(0, 0, 8, 8 * 1000)
    assert cm.iteration_time_s(0, 0, 8, 8 * 1000, 1e9) == pytest.approx(base + swap_s, rel=1e-12)
    assert cm.iteration_time_s(0, 0, 0, 0, 1e9) == pytest.approx(swap_s, rel=1e-12)


def test_tensor_parallel_all_reduce_is_charged_per_token() -> None:
    p = load_profile("llama70b_h100x4")
    no_comm = CostModel(dataclasses.replace(p, comm_s_per_token=0.0))
    extra_s = CostModel(p).iteration_time_s(1000, 1000 * 500.5, 24, 24 * 2048) - no_comm.iteration_time_s(
        1000, 1000 * 500.5, 24, 24 * 2048
    )
    assert extra_s == pytest.approx(1024 * p.comm_s_per_token, rel=1e-9)


def test_negative_arguments_are_rejected(cm: CostModel) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        cm.iteration_time_s(0, 0, -1, 0)
    with pytest.raises(ValueError, match=">= 0"):
        cm.iteration_time_s(np.array([1.0, np.nan]), 0, 0, 0)


def test_llama8b_kv_bytes_per_token() -> None:
    assert load_profile("llama8b_h100").kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072


def test_llama8b_matches_public_vllm_numbers(cm: CostModel) -> None:
    """vLLM on one H100: ~10-20 ms per decode step at batch 64 / context 2k, ~40-60 ms for a 2k prefill,
    and a KV cache of roughly 440k tokens at gpu_memory_utilization=0.9."""
    assert 10e-3 <= cm.iteration_time_s(0, 0, 64, 64 * 2048) <= 20e-3
    assert 40e-3 <= cm.iteration_time_s(2048, 2048 * 2049 / 2, 0, 0) <= 60e-3
    assert 400_000 <= cm.profile.kv_budget_bytes / cm.profile.kv_bytes_per_token <= 480_000


@pytest.mark.parametrize("name", available_profiles())
def test_shipped_profiles_load_and_leave_room_for_kv(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.source
    assert profile.kv_budget_bytes > 0
    assert load_profile(str(PROFILES_DIR / f"{name}.yaml")) == profile


def test_required_profiles_are_shipped() -> None:
    assert {"llama8b_h100", "llama70b_h100x4", "llama1b_h100", "tiny_cpu"} <= set(available_profiles())


def test_unknown_profile_name_lists_available() -> None:
    with pytest.raises(ValueError, match="llama8b_h100"):
        load_profile("gpt5_on_a_toaster")


def _write_variant(tmp_path: Path, drop: str | None = None, add: dict | None = None) -> Path:
    data = yaml.safe_load((PROFILES_DIR / "llama8b_h100.yaml").read_text())
    if drop:
        del data[drop]
    data.update(add or {})
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_with_missing_key_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        load_profile(str(_write_variant(tmp_path, drop="num_kv_heads")))


def test_yaml_with_extra_key_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        load_profile(str(_write_variant(tmp_path, add={"vocab_size": 128256})))


def test_yaml_defaults_are_optional_and_types_checked(tmp_path: Path) -> None:
    assert load_profile(str(_write_variant(tmp_path, drop="comm_s_per_token"))).comm_s_per_token == 0.0
    with pytest.raises(ValueError, match="num_layers must be int"):
        load_profile(str(_write_variant(tmp_path, add={"num_layers": 32.5})))


def test_profile_checks_its_values() -> None:
    p = load_profile("llama8b_h100")
    with pytest.raises(ValueError, match="flops_efficiency"):
        dataclasses.replace(p, flops_efficiency=1.5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(p, num_kv_heads=5)


def test_kv_budget_error_says_what_to_change() -> None:
    one_gpu_70b = dataclasses.replace(load_profile("llama70b_h100x4"), tensor_parallel=1)
    with pytest.raises(ValueError, match="raise tensor_parallel"):
        _ = one_gpu_70b.kv_budget_bytes


@settings(max_examples=50, deadline=None)
@given(
    name=st.sampled_from(available_profiles()),
    decode_seqs=st.integers(1, 512),
    kv=st.lists(st.integers(0, 10**7), min_size=1, max_size=20),
)
def test_decode_run_times_equal_scalar_calls_bit_for_bit(name: str, decode_seqs: int, kv: list[int]) -> None:
    model = CostModel(load_profile(name))
    run = model.decode_run_times_s(decode_seqs, np.array(kv, dtype=np.int64))
    for value, kv_read in zip(run.tolist(), kv, strict=True):
        assert value == model.iteration_time_s(0, 0.0, decode_seqs, kv_read, 0.0)
