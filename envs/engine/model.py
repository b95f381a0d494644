"""A Llama-style decoder in plain torch, over the engine's paged KV cache.

RMSNorm, rotary embeddings (rotate-half, as Llama), grouped-query attention, a SwiGLU MLP and a
tied or untied lm head; weights are random, drawn from a seed, so no checkpoint is needed and
every run builds the same model. Two forwards share every layer:

* ``forward(token_ids)``: one whole sequence with dense causal attention, the reference;
* ``forward_paged(...)``: a flat batch of decodes then prefill chunks that writes its K/V into
  the paged cache and attends through ``servegym.kernels`` (Triton on CUDA, torch on CPU).

Imports torch and ``servegym.kernels`` only (no gymnasium), so the GPU bench can load it alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from servegym import kernels

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the model (names follow Hugging Face's LlamaConfig)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    """Weights, activations and KV cache: float32, bfloat16 or float16."""
    max_position: int = 8192
    """Longest sequence the rotary table covers."""
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    """Std of the random weights: small, so activations and logits stay well-conditioned."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be an int >= 1, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        layer = attn + 3 * h * self.intermediate_size + 2 * h  # + SwiGLU MLP + two norms
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.torch_dtype.itemsize

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize


MODEL_PRESETS: dict[str, ModelConfig] = {
    # the tiny_cpu cost profile's shape: runs in milliseconds on 2 CPU cores
    "tiny": ModelConfig(
        vocab_size=1000,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=512,
        max_position=32768,
    ),
    # meta-llama/Llama-3.2-1B's shape (config.json), for the GPU
    "llama1b": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        tie_word_embeddings=True,
        dtype="bfloat16",
        max_position=131072,
    ),
}

PROFILE_MODELS = {"tiny_cpu": "tiny", "llama1b_h100": "llama1b"}
"""The model preset that each cost profile describes (the torch backend's default)."""


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, optionally with fields replaced (e.g. ``dtype="float32"``)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return replace(MODEL_PRESETS[name], **overrides)


# ------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel on CUDA (statistics in fp32): a decode step runs 2 x layers + 1 norms
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x (T, heads, D); cos, sin (T, 1, D/2) in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (T, heads, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (T, H, D), k and v (T, KV, D), rotary applied to q and k (in one pass: fewer kernels)."""
        qkv = self.qkv_proj(x).unflatten(-1, (-1, self.head_dim))  # (T, H + 2 KV, D)
        qk = apply_rotary(qkv[:, : self.num_heads + self.num_kv_heads], cos, sin)  # (T, H + KV, D)
        q, k = torch.split(qk, [self.num_heads, self.num_kv_heads], dim=1)
        return q, k, qkv[:, self.num_heads + self.num_kv_heads :]

    def dense(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One whole sequence, causal, no cache. x (T, hidden)."""
        q, k, v = self.project(x, cos, sin)
        group = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(group, dim=1)  # (T, H, D)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=self.scale
        )  # (H, T, D)
        projected: torch.Tensor = self.o_proj(out.transpose(0, 1).reshape(x.shape[0], self.q_size))
        return projected

    def paged(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: PagedBatch,
    ) -> torch.Tensor:
        """A flat batch, decodes first: write its K/V into the cache, then attend over it."""
        q, k, v = self.project(x, cos, sin)
        kernels.write_kv(k_cache, v_cache, k, v, batch.slot_mapping)  # before any read: a chunk sees itself
        nd = batch.num_decodes
        parts = []
        if nd:
            parts.append(
                kernels.paged_decode_attention(
                    q[:nd], k_cache, v_cache, batch.block_tables[:nd], batch.context_lens[:nd], self.scale
                )
            )
        if batch.num_seqs > nd:
            parts.append(
                kernels.paged_prefill_attention(
                    q[nd:],
                    k_cache,
                    v_cache,
                    batch.block_tables[nd:],
                    batch.prefill_cu_query_lens,
                    batch.context_lens[nd:],
                    self.scale,
                    max_query_len=batch.max_prefill_query_tokens,
                )
            )
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # (T, H, D)
        projected: torch.Tensor = self.o_proj(out.reshape(x.shape[0], self.q_size))
        return projected


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        down: torch.Tensor = self.down_proj(F.silu(gate) * up)
        return down


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


@dataclass
class PagedBatch:
    """Device tensors of one flat batch: ``num_decodes`` one-token sequences, then prefill
    chunks. ``context_lens`` count the cached prefix plus this step's tokens."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    cu_query_lens: torch.Tensor  # (B + 1,) int32
    context_lens: torch.Tensor  # (B,) int32
    block_tables: torch.Tensor  # (B, max_blocks) int32
    slot_mapping: torch.Tensor  # (T,) int64, block * block_size + offset; < 0 skips the write
    num_decodes: int
    max_prefill_query_tokens: int | None = None
    """The longest prefill chunk, when the caller knows it on the host; ``forward_paged`` fills it
    otherwise (one device-to-host read per forward, not one per layer)."""

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @functools.cached_property
    def prefill_cu_query_lens(self) -> torch.Tensor:
        """(P + 1,) int32 prefix sums of the prefill chunks; computed once per batch, not per layer."""
        cu = self.cu_query_lens[self.num_decodes :]
        return cu - cu[0]

    def longest_prefill_chunk(self) -> int:
        """Reads the chunk lengths back from the device: call once per forward, not per layer."""
        if self.num_seqs == self.num_decodes:
            return 0
        return int(self.prefill_cu_query_lens.diff().max())


class LlamaModel(nn.Module):
    rope_cos: torch.Tensor  # (P, D/2) fp32 buffers, registered in __init__
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.config = cfg
        with torch.device("meta"):  # shapes only; ``_init_weights`` materialises them
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = (
                None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            )
        self._init_weights(seed, torch.device(device))
        inv_freq = 1.0 / cfg.rope_theta ** (
            torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim
        )
        angles = torch.outer(torch.arange(cfg.max_position, dtype=torch.float64), inv_freq)
        self.register_buffer("rope_cos", angles.cos().float().to(device), persistent=False)  # (P, D/2)
        self.register_buffer("rope_sin", angles.sin().float().to(device), persistent=False)
        self.requires_grad_(False)

    def _init_weights(self, seed: int, device: torch.device) -> None:
        """Norms at one, every matrix N(0, init_std), drawn in a fixed order from ``seed`` on the
        target device (the same weights every run on one device type)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = self.config.torch_dtype
        for name, param in list(self.named_parameters()):
            if name.endswith("norm.weight"):
                value = torch.ones(param.shape, device=device, dtype=dtype)
            else:
                value = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
                value = (value * self.config.init_std).to(dtype)
            module_name, _, attr = name.rpartition(".")
            setattr(self.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=False))

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (T, 1, D/2)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Reference: logits (T, vocab) of one whole sequence, dense causal attention."""
        cos, sin = self._rope(torch.arange(token_ids.shape[0], device=token_ids.device))
        x = self.embed_tokens(token_ids)  # (T, hidden)
        for layer in self._decoder_layers():
            x = x + layer.attn.dense(layer.input_norm(x), cos, sin)
            x = x + layer.mlp(layer.post_attn_norm(x))
        logits: torch.Tensor = self.norm(x) @ self.head_weight.T
        return logits

    def forward_paged(
        self, batch: PagedBatch, kv_cache: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        """Logits (len(logits_indices), vocab) of the rows ``logits_indices`` of a flat batch,
        after writing every token's K/V. ``kv_cache`` is (2, layers, blocks, block_size, KV, D)."""
        if batch.num_seqs > batch.num_decodes and batch.max_prefill_query_tokens is None:
            batch = replace(batch, max_prefill_query_tokens=batch.longest_prefill_chunk())  # one sync
        cos, sin = self._rope(batch.positions)
        x = self.embed_tokens(batch.input_ids)  # (T, hidden)
        for index, layer in enumerate(self._decoder_layers()):
            x = x + layer.attn.paged(
                layer.input_norm(x), cos, sin, kv_cache[0, index], kv_cache[1, index], batch
            )
            x = x + layer.mlp(layer.post_attn_norm(x))
        # the lm head over B rows, not T
        logits: torch.Tensor = self.norm(x[logits_indices]) @ self.head_weight.T
        return logits

    def _decoder_layers(self) -> Iterable[DecoderLayer]:
        """``layers`` as what they are (``nn.ModuleList`` types its items as plain modules)."""
        return cast("Iterable[DecoderLayer]", self.layers)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, device: str | torch.device) -> torch.Tensor:
        """(2, layers, blocks, block_size, KV heads, head_dim), zeroed."""
        cfg = self.config
        shape = (2, cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        return torch.zeros(shape, dtype=cfg.torch_dtype, device=device)
