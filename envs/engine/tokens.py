"""Token ids for the real backend: what a prompt's segments and a call's outputs contain.

A ``Text(key, n)`` segment holds ``n`` ids that depend only on ``key`` (a stable hash, never
Python's salted ``hash()``), and token ``i`` does not depend on ``n``. So equal keys give equal
tokens and equal block hashes in the prefix cache mean equal KV contents. An ``Output(call)``
segment holds the tokens that call generated (greedy, from the model), recorded here; when a
continuation resumed that call's output (``EngineConfig.continue_truncated``), the segment runs on
into the continuation's tokens (the call table's ``continues`` column links them).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from servegym.envs.engine.calls import CallTable

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based mixer (SplitMix64's finaliser): x -> well-spread uint64, elementwise."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def key_seed(key: str) -> int:
    """A stable 64-bit seed of a content key (the same in every process and Python version)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def text_tokens(key: str, num_tokens: int, vocab_size: int, start: int = 0) -> np.ndarray:
    """Ids of tokens ``start .. start + num_tokens - 1`` of the text keyed ``key``."""
    index = np.arange(start, start + num_tokens, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(index ^ np.uint64(key_seed(key)))
    return (mixed % np.uint64(vocab_size)).astype(np.int64)


class TokenStore:
    """Token ids of every call of one engine, shared by the replicas' backends (a child on one
    replica reads the outputs its parent generated on another).

    ``keys`` is the engine's content-key table (key string -> id, ids assigned in insertion
    order), so a segment ``(key id, n)`` of the call table maps back to its key string.
    """

    def __init__(self, vocab_size: int, keys: dict[str, int] | None = None) -> None:
        self.vocab_size = vocab_size
        self.keys: dict[str, int] = keys if keys is not None else {}
        self._names: list[str] = []
        self._text: dict[int, np.ndarray] = {}  # key id -> longest prefix built so far
        self.outputs: dict[int, list[int]] = {}  # call id -> generated token ids
        self._prompts: dict[int, np.ndarray] = {}  # call id -> prompt token ids
        self.calls: CallTable | None = None  # the engine's calls: which continuation resumed an output

    def bind(self, keys: dict[str, int], calls: CallTable | None = None) -> None:
        """Read content keys (and continuations) from this engine's tables (called once the engine exists)."""
        if self.keys and self.keys is not keys:
            raise RuntimeError("a TokenStore serves one engine; build a new backend factory per engine")
        self.keys = keys
        self.calls = calls

    def output(self, call: int, num_tokens: int) -> list[int]:
        """The first ``num_tokens`` of ``call``'s whole output: its own tokens, then those of the
        continuations that resumed it, in order."""
        tokens = self.outputs.get(call, [])
        calls = self.calls
        while len(tokens) < num_tokens and calls is not None:
            after = np.flatnonzero(calls.continues[: calls.size] == call)  # rare: only past a cut
            if not len(after):
                break
            call = int(after[0])
            tokens = tokens + self.outputs.get(call, [])
        return tokens[:num_tokens]

    def _key_name(self, key_id: int) -> str:
        if key_id >= len(self._names):
            self._names = list(self.keys)  # ids are insertion order, so the list is id -> key
        return self._names[key_id]

    def text(self, key_id: int, num_tokens: int) -> np.ndarray:
        have = self._text.get(key_id)
        if have is None or len(have) < num_tokens:
            have = text_tokens(self._key_name(key_id), num_tokens, self.vocab_size)
            self._text[key_id] = have
        return have[:num_tokens]

    def prompt(self, call: int, segments: list[tuple[int, int]]) -> np.ndarray:
        """The call's prompt ids from its resolved segments (memoised: a prompt never changes)."""
        ids = self._prompts.get(call)
        if ids is None:
            parts = []
            for key_id, length in segments:
                if key_id >= 0:
                    parts.append(self.text(key_id, length))
                else:  # Output(source): the tokens the source call (and its continuations) generated
                    source = self.output(-1 - key_id, length)
                    if len(source) < length:
                        raise RuntimeError(
                            f"call {call}'s prompt reads {length} output tokens of call {-1 - key_id}, "
                            f"which generated only {len(source)}: the backend did not run that call"
                        )
                    parts.append(np.asarray(source, dtype=np.int64))
            ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            self._prompts[call] = ids
        return ids

    def tokens(self, call: int, segments: list[tuple[int, int]], start: int, stop: int) -> np.ndarray:
        """Ids at positions ``start .. stop - 1`` of the call's sequence (prompt, then outputs)."""
        prompt = self.prompt(call, segments)
        num_prompt = len(prompt)
        if stop <= num_prompt:
            return prompt[start:stop]
        out = self.outputs.get(call, [])
        tail = np.asarray(out[max(start - num_prompt, 0) : stop - num_prompt], dtype=np.int64)
        if start >= num_prompt:
            return tail
        return np.concatenate([prompt[start:], tail])
