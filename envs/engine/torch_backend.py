"""The real backend: each engine iteration runs the scheduled batch through a Llama-style model
over the replica's paged KV cache, and the virtual clock advances by the measured time.

The block manager's GPU block ids index the KV tensors directly, so block tables, prefix hits,
preemption and swapping are the engine's own; this module only moves data. A swapped-out call's
blocks are copied to host memory before the block manager can hand them out again, and copied
back into its new blocks on swap-in; a recomputed call simply re-prefills. Tokens come from a
``TokenStore``: text segments from their keys, outputs from the model's greedy choices. Calls
stop at the workload's target length (not at EOS), so both backends see the same world.

Two layers: ``ModelRunner`` turns flat numpy inputs into logits (eager, or CUDA-graph replay
for decode-only batches on a GPU); ``TorchBackend`` builds those inputs from the call table.
"""

from __future__ import annotations

import gc
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from servegym.envs.engine.backend import Batch, SimBackend
from servegym.envs.engine.config import TORCH_TIMINGS
from servegym.envs.engine.cost_model import ModelProfile
from servegym.envs.engine.model import PROFILE_MODELS, LlamaModel, ModelConfig, PagedBatch, model_config
from servegym.envs.engine.tokens import TokenStore

if TYPE_CHECKING:
    from servegym.envs.engine.config import EngineConfig
    from servegym.envs.engine.scheduler import Replica

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Decode batch sizes captured in CUDA graphs; a batch pads up to the next one."""
_MODELS: dict[tuple[str, int, str], LlamaModel] = {}
"""Models built in this process, by (preset, seed, device): weights are read-only, so engines
(an env builds one per episode) share them instead of drawing them again."""


@dataclass(frozen=True)
class TimedIteration:
    """One executed iteration as the cost model sees it, with the time the clock advanced by:
    what calibration fits on when it profiles batches inside a running engine."""

    prefill_tokens: int
    prefill_attn_tokens: float
    decode_seqs: int
    kv_read_tokens: int
    num_seqs: int
    graphed: bool
    """Replayed from a CUDA graph (decode-only batches on a GPU), rather than run eagerly."""
    time_s: float

    @property
    def kind(self) -> str:
        if not self.prefill_tokens:
            return "decode (graph)" if self.graphed else "decode (eager)"
        return "mixed" if self.decode_seqs else "prefill"


class ModelRunner:
    """Runs flat batches (decodes first, then prefill chunks) of one model over one KV cache."""

    def __init__(
        self,
        model: LlamaModel,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int = 256,
        cuda_graphs: bool = True,
        graph_max_context_tokens: int = 8192,
    ) -> None:
        self.model = model
        self.device = model.rope_cos.device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_cache = model.allocate_kv_cache(num_blocks, block_size, self.device)  # (2, L, N, bs, KV, D)
        # Graphs hold block tables this wide; longer contexts decode eagerly (vLLM's max_seq_len_to_capture).
        # The decode kernel sizes its context splits by the table width, so keep it near real contexts.
        graph_tokens = min(graph_max_context_tokens, model.config.max_position)
        self.graph_blocks_per_seq = min(num_blocks, -(-graph_tokens // block_size))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_fallback: str | None = None  # why decode batches run eagerly on a GPU
        self.num_graph_replays = 0
        if self.device.type == "cuda":
            self._compile_kernels()
        if self.device.type == "cuda" and cuda_graphs:
            try:
                smaller = [b for b in GRAPH_BATCH_SIZES if b < max_num_seqs]
                self._capture(smaller + [b for b in GRAPH_BATCH_SIZES if b >= max_num_seqs][:1])
            except Exception as exc:  # e.g. a kernel that syncs with the host: eager still works
                self.graphs.clear()
                self.graph_fallback = (
                    f"CUDA graph capture failed ({type(exc).__name__}: {exc}); decoding eagerly"
                )
                warnings.warn(self.graph_fallback, stacklevel=2)

    # ------------------------------------------------------------------ eager
    def _device_batch(self, arrays: dict[str, np.ndarray], num_decodes: int) -> PagedBatch:
        dev = self.device

        def put(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(arrays[name]).to(device=dev, dtype=dtype, non_blocking=True)

        chunk_tokens = np.diff(arrays["cu_query_lens"][num_decodes:])  # (P,) prefill chunks, on the host
        return PagedBatch(
            input_ids=put("input_ids", torch.long),
            positions=put("positions", torch.long),
            cu_query_lens=put("cu_query_lens", torch.int32),
            context_lens=put("context_lens", torch.int32),
            block_tables=put("block_tables", torch.int32),
            slot_mapping=put("slot_mapping", torch.long),
            num_decodes=num_decodes,
            max_prefill_query_tokens=int(chunk_tokens.max()) if len(chunk_tokens) else 0,
        )

    @torch.inference_mode()
    def execute(self, arrays: dict[str, np.ndarray], num_decodes: int, eager: bool = False) -> torch.Tensor:
        """Logits (B, vocab) at each sequence's last token; K/V of every token written.
        ``arrays`` holds input_ids, positions, slot_mapping (T,), cu_query_lens (B + 1,),
        context_lens (B,) and block_tables (B, max_blocks)."""
        num_seqs = len(arrays["context_lens"])
        if not eager and self.graphs and num_decodes == num_seqs:
            size = next((b for b in self.graphs if b >= num_seqs), None)
            if size is not None and arrays["block_tables"].shape[1] <= self.graph_blocks_per_seq:
                return self._replay(arrays, num_seqs, size)
        batch = self._device_batch(arrays, num_decodes)
        last = (batch.cu_query_lens[1:] - 1).long()  # (B,)
        return self.model.forward_paged(batch, self.kv_cache, last)

    def _compile_kernels(self) -> None:
        """Run one eager batch of each kernel path (a decode with a prefill chunk after it, a pure
        prefill, a decode long enough to split and merge) so that Triton compiles its variants now,
        not inside an iteration the engine's clock times. Writes nothing (every slot is -1)."""
        bs = self.block_size
        split_context = min(self.num_blocks * bs, 2048)  # > 256 tokens: more than one split
        for computed, new in (((0, 0), (1, 2)), ((0,), (2,)), ((split_context - 1,), (1,))):
            computed_arr, new_arr = np.array(computed), np.array(new)
            blocks = -(-(computed_arr + new_arr) // bs)
            arrays = flat_inputs(
                [[0] * int(b) for b in blocks],
                computed_arr,
                new_arr,
                [np.zeros(n, np.int64) for n in new],
                bs,
            )
            arrays["slot_mapping"][:] = -1
            self.execute(arrays, num_decodes=int(np.count_nonzero(new_arr == 1)), eager=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ CUDA graphs
    def _capture(self, sizes: list[int]) -> None:
        """Capture decode-only forwards at each size over static input buffers (nano-vllm's scheme):
        the largest first, all sharing one memory pool."""
        dev, top = self.device, max(sizes)
        self.static = {
            "input_ids": torch.zeros(top, dtype=torch.long, device=dev),
            "positions": torch.zeros(top, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((top,), -1, dtype=torch.long, device=dev),
            "context_lens": torch.zeros(top, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros(top, self.graph_blocks_per_seq, dtype=torch.int32, device=dev),
            "cu_query_lens": torch.arange(top + 1, dtype=torch.int32, device=dev),
            "rows": torch.arange(top, dtype=torch.long, device=dev),
        }
        s = self.static
        pool = None
        for size in sorted(sizes, reverse=True):
            batch = PagedBatch(
                input_ids=s["input_ids"][:size],
                positions=s["positions"][:size],
                cu_query_lens=s["cu_query_lens"][: size + 1],
                context_lens=s["context_lens"][:size],
                block_tables=s["block_tables"][:size],
                slot_mapping=s["slot_mapping"][:size],
                num_decodes=size,
            )
            with torch.inference_mode():
                self.model.forward_paged(batch, self.kv_cache, s["rows"][:size])  # warm-up (compiles kernels)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model.forward_paged(batch, self.kv_cache, s["rows"][:size])
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        self.graphs = dict(sorted(self.graphs.items()))
        torch.cuda.synchronize()

    def _replay(self, arrays: dict[str, np.ndarray], num_seqs: int, size: int) -> torch.Tensor:
        s = self.static
        width = arrays["block_tables"].shape[1]
        s["slot_mapping"][num_seqs:size].fill_(-1)  # padding rows write nothing
        s["context_lens"][num_seqs:size].zero_()  # and attend to nothing (their output is zero)
        for name in ("input_ids", "positions", "slot_mapping", "context_lens"):
            s[name][:num_seqs].copy_(torch.from_numpy(arrays[name]), non_blocking=True)
        s["block_tables"][:num_seqs, :width].copy_(
            torch.from_numpy(arrays["block_tables"]), non_blocking=True
        )
        graph, logits = self.graphs[size]
        graph.replay()
        self.num_graph_replays += 1
        return logits[:num_seqs]

    # ------------------------------------------------------------------ swapping
    def copy_out(self, blocks: list[int]) -> torch.Tensor:
        """Host copy (pinned on CUDA) of ``blocks`` of every layer's K and V."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        gathered = self.kv_cache.index_select(2, index)  # (2, L, n, bs, KV, D)
        if self.device.type != "cuda":
            return gathered
        host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
        host.copy_(gathered, non_blocking=True)  # same stream as later writes: ordered before them
        return host

    def copy_in(self, host: torch.Tensor, blocks: list[int]) -> None:
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        self.kv_cache.index_copy_(2, index, host.to(self.device, non_blocking=True))


def flat_inputs(
    tables: list[list[int]],
    computed: np.ndarray,
    num_new: np.ndarray,
    token_ids: list[np.ndarray],
    block_size: int,
) -> dict[str, np.ndarray]:
    """The runner's arrays for sequences with ``computed`` cached tokens each computing
    ``num_new`` more (``token_ids`` theirs), over block tables ``tables``."""
    num_seqs = len(tables)
    context = computed + num_new  # (B,)
    width = max(int(-(-context.max() // block_size)), 1)
    block_tables = np.zeros((num_seqs, width), dtype=np.int32)
    for row, table in enumerate(tables):
        used = table[:width]
        block_tables[row, : len(used)] = used
    cu = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(num_new, out=cu[1:])
    seq = np.repeat(np.arange(num_seqs), num_new)  # (T,)
    positions = np.arange(int(cu[-1])) - cu[seq] + computed[seq]  # (T,)
    slots = block_tables[seq, positions // block_size].astype(np.int64) * block_size + positions % block_size
    return {
        "input_ids": np.concatenate(token_ids).astype(np.int64),
        "positions": positions.astype(np.int64),
        "cu_query_lens": cu.astype(np.int32),
        "context_lens": context.astype(np.int32),
        "block_tables": block_tables,
        "slot_mapping": slots,
    }


class TorchBackend:
    """The Backend protocol over a real model: ``iteration_time_s`` executes the batch.

    ``timing="measured"`` (default) advances the clock by the measured time (CUDA events on a
    GPU, ``perf_counter`` on CPU); ``"cost_model"`` runs the model for its tokens but takes the
    time from the profile's cost model, so runs are reproducible bit for bit (tests).
    ``record_logits`` keeps each sampled row's logits per call (tests compare them);
    ``record_iterations`` keeps a ``TimedIteration`` per batch in ``iterations`` (calibration).
    """

    supports_fast_forward = False

    def __init__(
        self,
        model: LlamaModel,
        tokens: TokenStore,
        profile: ModelProfile,
        timing: str = "measured",
        cuda_graphs: bool = True,
        record_logits: bool = False,
        record_iterations: bool = False,
    ) -> None:
        if timing not in TORCH_TIMINGS:
            raise ValueError(f"timing must be one of {TORCH_TIMINGS}, got {timing!r}")
        _check_profile(model.config, profile)
        self.model = model
        self.tokens = tokens
        self.profile = profile
        self.timing = timing
        self.cost = SimBackend(profile) if timing == "cost_model" else None
        self.cuda_graphs = cuda_graphs
        self.record_logits = record_logits
        self.logits: dict[int, list[tuple[int, np.ndarray]]] = {}  # call -> (context tokens, logits)
        self.record_iterations = record_iterations
        self.iterations: list[TimedIteration] = []
        self.runner: ModelRunner | None = None
        self.host_kv: dict[int, torch.Tensor] = {}  # swapped call -> its blocks' K/V on the host
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0

    def attach(self, replica: Replica, keys: dict[str, int]) -> None:
        """Called by the engine once the replica exists: size the KV cache by its block manager
        and listen to its swaps."""
        self.replica = replica
        self.calls = replica.calls
        self.block_size = replica.config.block_size
        self.tokens.bind(keys, replica.calls)
        self.runner = ModelRunner(
            self.model,
            replica.blocks.num_blocks,
            self.block_size,
            replica.config.max_num_seqs,
            self.cuda_graphs,
        )
        replica.swap_listener = self

    # ------------------------------------------------------------------ Backend protocol
    def iteration_time_s(self, batch: Batch) -> float:
        """Run the batch and return its time, with Python's cyclic GC held off meanwhile: a
        collection of the engine's own objects would otherwise land in whichever iteration
        allocates past the threshold (eager forwards allocate the most) and add tens of ms to
        it, which is the harness, not the inference step (vLLM freezes its GC for the same reason)."""
        runner = self._attached_runner()
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(batch, runner)
        finally:
            if enabled:
                gc.enable()

    def _attached_runner(self) -> ModelRunner:
        if self.runner is None:
            raise RuntimeError("TorchBackend.attach(replica, keys) must run before the first batch")
        return self.runner

    def _run(self, batch: Batch, runner: ModelRunner) -> float:
        cuda = runner.device.type == "cuda"
        if cuda:
            # torch.cuda.Event's constructor is unannotated
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
        else:
            t0 = time.perf_counter()
        calls, store, bs = self.calls, self.tokens, self.block_size
        new = batch.num_new_tokens
        order = np.argsort(new != 1, kind="stable")  # one-token steps (decodes) first
        ids, new = batch.calls[order], new[order]
        num_decodes = int(np.count_nonzero(new == 1))
        computed = calls.num_computed[ids]
        ids_list = ids.tolist()
        segments, tables = calls.segments, calls.blocks
        token_ids = [
            store.tokens(call, segments[call], c, c + n)
            for call, c, n in zip(ids_list, computed.tolist(), new.tolist(), strict=True)
        ]
        arrays = flat_inputs([tables[call] for call in ids_list], computed, new, token_ids, bs)
        longest = int(arrays["context_lens"].max())
        if longest > self.model.config.max_position:
            raise ValueError(
                f"a call reached {longest} tokens, past the model's max_position "
                f"{self.model.config.max_position}; shorten the workload's contexts"
            )
        replays = runner.num_graph_replays
        logits = runner.execute(arrays, num_decodes)  # (B, vocab)
        next_tokens = logits.argmax(dim=-1)
        if cuda:
            end.record()
        sampled = np.flatnonzero(new == batch.remaining_tokens[order])  # all known tokens computed
        chosen = next_tokens.cpu().numpy()  # waits for the device
        outputs = store.outputs
        for row in sampled.tolist():
            outputs.setdefault(ids_list[row], []).append(int(chosen[row]))
        if self.record_logits:
            rows = logits.float().cpu().numpy()
            context = computed + new
            for row in sampled.tolist():
                self.logits.setdefault(ids_list[row], []).append((int(context[row]), rows[row].copy()))
        if self.cost is not None:
            elapsed = self.cost.iteration_time_s(batch)
        elif cuda:
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            elapsed = time.perf_counter() - t0
        if self.record_iterations:
            self.iterations.append(
                TimedIteration(
                    prefill_tokens=batch.prefill_tokens,
                    prefill_attn_tokens=batch.prefill_attn_tokens,
                    decode_seqs=batch.num_decodes,
                    kv_read_tokens=batch.kv_read_tokens,
                    num_seqs=len(ids_list),
                    graphed=runner.num_graph_replays > replays,
                    time_s=elapsed,
                )
            )
        return elapsed

    def decode_run_times_s(self, num_decodes: int, kv_read_tokens: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the torch backend runs every iteration; it never fast-forwards")

    # ------------------------------------------------------------------ swap listener
    def swap_out(self, call: int) -> None:
        """The scheduler is about to free a swapped call's blocks: keep their K/V on the host."""
        num = -(-int(self.calls.num_computed[call]) // self.block_size)
        blocks = self.calls.blocks[call][:num]
        if blocks:
            self.host_kv[call] = self._attached_runner().copy_out(blocks)
            self.num_swapped_out_blocks += len(blocks)

    def swap_in(self, call: int, num_hit_blocks: int) -> None:
        """The call got new blocks (after ``num_hit_blocks`` prefix hits): restore the rest."""
        host = self.host_kv.pop(call, None)
        num = -(-int(self.calls.num_computed[call]) // self.block_size)
        if host is None or num <= num_hit_blocks:
            return
        self._attached_runner().copy_in(
            host[:, :, num_hit_blocks:num], self.calls.blocks[call][num_hit_blocks:num]
        )
        self.num_swapped_in_blocks += num - num_hit_blocks

    def drop(self, call: int) -> None:
        """The replica went down: the call's host copy is lost (it recomputes elsewhere), and so
        is the token the iteration in flight sampled for it (the engine never applied it; the
        model samples it again where the call resumes)."""
        self.host_kv.pop(call, None)
        kept = int(self.calls.num_output[call])
        outputs = self.tokens.outputs.get(call)
        if outputs is not None:
            del outputs[kept:]
        if call in self.logits:
            end = int(self.calls.prompt_tokens[call]) + kept
            self.logits[call] = [(ctx, row) for ctx, row in self.logits[call] if ctx < end]


def _check_profile(cfg: ModelConfig, profile: ModelProfile) -> None:
    """The replica's KV budget and cost model come from the profile: its shape must be the model's."""
    want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, float(cfg.kv_bytes_per_token))
    have = (profile.num_layers, profile.num_kv_heads, profile.head_dim, float(profile.kv_bytes_per_token))
    if want != have:
        raise ValueError(
            f"cost profile {profile.name!r} describes (layers, kv heads, head dim, KV bytes/token) = {have}, "
            f"but the torch backend's model has {want}; pick the profile of that model "
            f"(presets per profile: {PROFILE_MODELS}) or set engine.model to match"
        )


class TorchBackendFactory:
    """Builds one ``TorchBackend`` per replica from the engine config; replicas of one model
    share its weights, and all share one ``TokenStore`` (a child reads its parent's outputs).
    ``timing`` overrides ``config.torch_timing`` (tests)."""

    def __init__(
        self,
        config: EngineConfig,
        device: str | None = None,
        timing: str | None = None,
        seed: int = 0,
        cuda_graphs: bool = True,
        record_logits: bool = False,
        record_iterations: bool = False,
    ) -> None:
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            torch.set_num_threads(config.torch_threads)  # deliberate: engines run beside each other
        self.timing, self.seed, self.cuda_graphs = timing or config.torch_timing, seed, cuda_graphs
        self.record_logits, self.record_iterations = record_logits, record_iterations
        self.tokens: TokenStore | None = None
        self.backends: list[TorchBackend] = []

    def model_name(self, profile: ModelProfile) -> str:
        name = self.config.model or PROFILE_MODELS.get(profile.name)
        if name is None:
            raise ValueError(
                f"engine.backend=torch needs a model for profile {profile.name!r}: set engine.model "
                f"(a preset) or use a profile with a known model ({sorted(PROFILE_MODELS)})"
            )
        return name

    def __call__(self, profile: ModelProfile) -> TorchBackend:
        name = self.model_name(profile)
        key = (name, self.seed, str(self.device))
        model = _MODELS.get(key)
        if model is None:
            _check_profile(model_config(name), profile)  # before building a model of the wrong size
            model = _MODELS[key] = LlamaModel(model_config(name), seed=self.seed, device=self.device)
        if self.tokens is None:
            self.tokens = TokenStore(model.config.vocab_size)
        elif self.tokens.vocab_size != model.config.vocab_size:
            raise ValueError(
                "torch backend replicas must share one vocabulary (a child reads its parent's tokens); "
                f"got vocab sizes {self.tokens.vocab_size} and {model.config.vocab_size}"
            )
        backend = TorchBackend(
            model,
            self.tokens,
            profile,
            self.timing,
            self.cuda_graphs,
            self.record_logits,
            self.record_iterations,
        )
        self.backends.append(backend)
        return backend
