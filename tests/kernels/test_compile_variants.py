"""On a GPU: once ``ModelRunner`` is built, no batch an engine can form compiles a new Triton kernel
variant (the runner compiles them up front; see ``kernels/triton_paged.py``). Skips without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles kernels only on a GPU")
def test_no_kernel_compiles_once_the_runner_is_built() -> None:
    """Every batch an engine can form (any number of decodes before any prefill chunks, any table
    width up to 8k tokens, eager or graphed) reuses the variants ``ModelRunner`` compiled at build:
    a compile inside a timed iteration would add ~0.1-1 s to the engine's clock."""
    from servegym.envs.engine.model import LlamaModel, model_config
    from servegym.envs.engine.torch_backend import ModelRunner, flat_inputs
    from servegym.kernels import triton_paged as tp

    kernels = (tp._write_kv_kernel, tp._decode_split_kernel, tp._decode_merge_kernel, tp._prefill_kernel)
    device = torch.cuda.current_device()

    def compiled() -> int:
        return sum(len(k.device_caches[device][0]) for k in kernels)

    bs, num_blocks = 16, 1024
    runner = ModelRunner(LlamaModel(model_config("tiny"), device="cuda"), num_blocks, bs, max_num_seqs=64)
    built = compiled()
    rng = np.random.default_rng(0)
    for step in range(60):
        nd, npf = int(rng.integers(0, 12)), int(rng.integers(0, 3))
        if nd + npf == 0:
            nd = 1
        new = np.concatenate([np.ones(nd, np.int64), rng.integers(2, 300, size=npf)])
        computed = (
            rng.integers(0, 8192 - 300, size=nd + npf) if step % 3 else rng.integers(0, 64, size=nd + npf)
        )
        blocks = -(-(computed + new) // bs)
        perm = rng.permutation(num_blocks)
        tables = [perm[: int(b)].tolist() for b in blocks]
        tokens = [rng.integers(0, 1000, size=int(n)) for n in new]
        arrays = flat_inputs(tables, computed, new, tokens, bs)
        arrays["slot_mapping"][:] = -1
        runner.execute(arrays, nd, eager=bool(step % 2))
    torch.cuda.synchronize()
    assert compiled() == built, "a batch compiled a new Triton kernel variant after the runner was built"
