"""The Llama-style model over paged KV, its token ids, and the GPU bench's CPU mode.

Paged forwards (mixed batches of decodes and prefill chunks, scattered block tables, a prefix
shared through the block table) must give the full-sequence forward's logits: fp32 on CPU,
max abs diff <= 1e-4 (observed ~1e-6).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from servegym.envs.engine.cost_model import load_profile
from servegym.envs.engine.model import MODEL_PRESETS, PROFILE_MODELS, LlamaModel, ModelConfig, model_config
from servegym.envs.engine.tokens import TokenStore, text_tokens
from servegym.envs.engine.torch_backend import ModelRunner, flat_inputs

ROOT = Path(__file__).resolve().parents[2]
LOGIT_ATOL = 1e-4
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    torch.set_num_threads(1)
    return LlamaModel(model_config("tiny"), seed=0)


def test_paged_mixed_batches_match_the_full_forward(model: LlamaModel) -> None:
    """Three sequences advance together in mixed batches (decodes first, then chunks of any
    size) over scattered blocks; a fourth shares the first's leading blocks (a prefix hit)."""
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    num_blocks = 64
    runner = ModelRunner(model, num_blocks, BLOCK_SIZE)
    lengths = [37, 20, 29]
    seqs = [rng.integers(0, vocab, n) for n in lengths]
    shared = 3  # blocks of seq 0 that seq 3 reuses
    seqs.append(np.concatenate([seqs[0][: shared * BLOCK_SIZE], rng.integers(0, vocab, 9)]))
    free = rng.permutation(num_blocks).tolist()
    tables = [[free.pop() for _ in range(-(-len(s) // BLOCK_SIZE))] for s in seqs[:3]]
    tables.append(tables[0][:shared] + [free.pop() for _ in range(-(-len(seqs[3]) // BLOCK_SIZE) - shared)])
    with torch.inference_mode():
        full = [model(torch.from_numpy(s)) for s in seqs]  # (len, vocab) each
    done = [0, 0, 0, shared * BLOCK_SIZE]  # seq 3 starts after its cached prefix
    live = [0, 1, 2]  # seq 3 joins once seq 0's shared blocks are written
    worst, steps = 0.0, 0
    while live:
        # each live sequence takes a random chunk (or its one remaining token); decodes go first
        chunks = {i: int(min(len(seqs[i]) - done[i], rng.integers(1, 9))) for i in live}
        order = sorted(live, key=lambda i: chunks[i] != 1)
        arrays = flat_inputs(
            [tables[i] for i in order],
            np.array([done[i] for i in order]),
            np.array([chunks[i] for i in order]),
            [seqs[i][done[i] : done[i] + chunks[i]] for i in order],
            BLOCK_SIZE,
        )
        logits = runner.execute(arrays, num_decodes=sum(chunks[i] == 1 for i in order))
        for row, i in enumerate(order):
            done[i] += chunks[i]
            worst = max(worst, float((logits[row] - full[i][done[i] - 1]).abs().max()))
        steps += 1
        live = [i for i in live if done[i] < len(seqs[i])]
        if 3 not in live and done[3] < len(seqs[3]) and done[0] >= shared * BLOCK_SIZE:
            live.append(3)
    assert steps > 5 and worst <= LOGIT_ATOL, f"max |paged - full| = {worst:.2e} over {steps} steps"


def test_paged_forward_reads_the_cache_not_just_the_batch(model: LlamaModel) -> None:
    """Corrupting an earlier block changes a later decode: attention really reads the cache."""
    runner = ModelRunner(model, 8, BLOCK_SIZE)
    tokens = np.arange(9) % model.config.vocab_size
    table = [5, 2, 7]
    prefill = flat_inputs([table], np.array([0]), np.array([8]), [tokens[:8]], BLOCK_SIZE)
    runner.execute(prefill, num_decodes=0)
    decode = flat_inputs([table], np.array([8]), np.array([1]), [tokens[8:]], BLOCK_SIZE)
    before = runner.execute(decode, num_decodes=1).clone()
    runner.kv_cache[:, :, 2] += 1.0
    after = runner.execute(decode, num_decodes=1)
    assert float((after - before).abs().max()) > 1e-3


def test_model_is_deterministic_from_its_seed() -> None:
    cfg = model_config("tiny", num_layers=1)
    ids = torch.arange(10)
    a, b, c = (LlamaModel(cfg, seed=s) for s in (3, 3, 4))
    assert torch.equal(a(ids), b(ids)) and not torch.equal(a(ids), c(ids))


def test_presets_match_their_cost_profiles() -> None:
    """The KV budget and cost model come from the profile, so its shape must be the model's."""
    for profile_name, preset in PROFILE_MODELS.items():
        cfg, profile = MODEL_PRESETS[preset], load_profile(profile_name)
        assert cfg.num_params == profile.num_params
        assert cfg.kv_bytes_per_token == profile.kv_bytes_per_token
        assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (
            profile.num_layers,
            profile.num_kv_heads,
            profile.head_dim,
        )
    assert LlamaModel(model_config("tiny")).num_params() == MODEL_PRESETS["tiny"].num_params


def test_bad_model_configs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        model_config("nope")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(
            vocab_size=8,
            hidden_size=8,
            num_layers=1,
            num_heads=3,
            num_kv_heads=2,
            head_dim=4,
            intermediate_size=8,
        )
    with pytest.raises(ValueError, match="model.dtype"):
        model_config("tiny", dtype="int8")


def test_text_tokens_are_stable_and_prefix_consistent() -> None:
    ids = text_tokens("sys/worker", 12, 1000)
    assert ids.tolist()[:4] == text_tokens("sys/worker", 4, 1000).tolist()  # token i ignores the length
    assert ids.tolist()[5:] == text_tokens("sys/worker", 7, 1000, start=5).tolist()
    assert ids.min() >= 0 and ids.max() < 1000
    assert not np.array_equal(ids, text_tokens("sys/planner", 12, 1000))
    # a stable hash: the same ids in a process with another PYTHONHASHSEED
    code = "from servegym.envs.engine.tokens import text_tokens; print(text_tokens('sys/worker', 12, 1000).tolist())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(ids.tolist())


def test_token_store_builds_prompts_from_keys_and_outputs() -> None:
    keys = {"sys": 0, "q": 1}
    store = TokenStore(1000, keys)
    store.outputs[4] = [7, 8, 9]
    prompt = store.prompt(5, [(0, 6), (-1 - 4, 3), (1, 2)])
    assert (
        prompt.tolist()
        == text_tokens("sys", 6, 1000).tolist() + [7, 8, 9] + text_tokens("q", 2, 1000).tolist()
    )
    store.outputs[5] = [1, 2]
    assert store.tokens(5, [], 9, 13).tolist() == prompt[9:].tolist() + [1, 2]
    with pytest.raises(RuntimeError, match="generated only 3"):
        store.prompt(6, [(-1 - 4, 5)])


@pytest.mark.slow
def test_bench_quick_runs_without_gymnasium() -> None:
    """The GPU machine has torch and triton but no gymnasium: the bench must not need it."""
    code = (
        "import sys, runpy\n"
        "for name in ('gymnasium', 'hydra', 'stable_baselines3'): sys.modules[name] = None\n"
        "sys.argv = ['bench_model.py', '--quick', '--iters', '2']\n"
        "runpy.run_path('scripts/bench_model.py', run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "argmax agrees 10/10" in out.stdout and "x roofline" in out.stdout
    assert "engine: 30 calls" in out.stdout and "(OK: <= 1e-3)" in out.stdout
