"""Prompt text for a workload's calls: the same key always gives the same words, so calls that
share a system prompt or a job's input share a prefix on the server, and an ``Output`` segment is
the text the parent call really generated."""

from __future__ import annotations

import hashlib

import numpy as np

from servegym.envs.workloads.job import Job, Output, Text

FIRST_WORD_ID = 4
"""Word ids below this are the tests' tokenizer's special tokens (unk, bos, eos, pad)."""


class PromptBuilder:
    """Builds ``call``'s prompt from its segments; memoises each ``Text`` key's words."""

    def __init__(self, vocab_size: int = 1000) -> None:
        if vocab_size <= FIRST_WORD_ID:
            raise ValueError(f"vocab_size must be > {FIRST_WORD_ID}, got {vocab_size}")
        self.vocab_size = vocab_size
        self._texts: dict[tuple[str, int], str] = {}

    def text(self, segment: Text) -> str:
        """``segment.num_tokens`` words drawn from a generator seeded by its key (stable across
        processes, unlike ``hash``)."""
        key = (segment.key, segment.num_tokens)
        words = self._texts.get(key)
        if words is None:
            seed = int.from_bytes(hashlib.blake2b(segment.key.encode(), digest_size=8).digest(), "little")
            ids = np.random.default_rng(seed).integers(FIRST_WORD_ID, self.vocab_size, segment.num_tokens)
            words = self._texts[key] = " ".join(f"w{i}" for i in ids)
        return words

    def prompt(self, job: Job, call_id: int, outputs: dict[int, str]) -> str:
        """The call's prompt: its segments joined by spaces, ancestors' outputs from ``outputs``
        (call id -> generated text; every ancestor the prompt names must be there)."""
        parts = []
        for segment in job.calls[call_id].prompt:
            if isinstance(segment, Text):
                parts.append(self.text(segment))
            elif isinstance(segment, Output):
                if segment.call not in outputs:
                    raise KeyError(
                        f"job {job.job_id!r} call {call_id}: output of call {segment.call} is not in yet"
                    )
                parts.append(outputs[segment.call].strip())
        return " ".join(part for part in parts if part)
