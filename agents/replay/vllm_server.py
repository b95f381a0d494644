"""``vllm serve`` with servegym's scheduler: the command line, and a context manager that starts it
on 127.0.0.1, waits until it answers, and stops it (for tests and benchmarks on one machine).

The command (vLLM 0.32.0; the ``vllm`` console script fails under the CPU build's distribution
name, so ``python -m`` it)::

    SERVEGYM_POLICY=/path/policy.onnx \\
    python -m vllm.entrypoints.openai.api_server --model MODEL --host 127.0.0.1 --port 8000 \\
        --scheduler-cls servegym.agents.deploy.vllm_adapter.ServegymScheduler

``SERVEGYM_POLICY`` (a ``policy.onnx`` with its ``policy.json``, or ``module:attr``) is read by the
scheduler when vLLM builds it; ``SERVEGYM_CLOCK``/``SERVEGYM_STEP_S``/``SERVEGYM_HORIZON_S``/
``SERVEGYM_TIME_SCALE_S``/``SERVEGYM_STATS_PATH`` likewise (``servegym.agents.deploy.vllm_adapter``). On a
CPU-only machine vLLM also needs ``VLLM_CPU_KVCACHE_SPACE`` (GiB) set."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

SCHEDULER_CLS = "servegym.agents.deploy.vllm_adapter.ServegymScheduler"


def serve_command(
    model: str | Path,
    port: int,
    scheduler: bool = True,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """vLLM's OpenAI server on 127.0.0.1:``port``, with ``ServegymScheduler`` when ``scheduler``."""
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if scheduler:
        command += ["--scheduler-cls", SCHEDULER_CLS]
    return command + list(extra_args)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(
    command: Sequence[str],
    port: int,
    env: Mapping[str, str],
    log_path: Path,
    startup_timeout_s: float = 180.0,
) -> Iterator[str]:
    """Start ``command`` (with ``env`` added to this process's environment, output to
    ``log_path``), yield its ``http://127.0.0.1:port/v1`` once ``/health`` answers 200, and stop it
    (SIGTERM, then SIGKILL after 30 s) however the block ends. A server that exits or stays
    unhealthy for ``startup_timeout_s`` is an error quoting the end of its log."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(command),
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {process.returncode}:\n{_tail(log_path)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vLLM server not healthy after {startup_timeout_s:g} s:\n{_tail(log_path)}"
                )
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _tail(path: Path, num_chars: int = 3000) -> str:
    return Path(path).read_text(errors="replace")[-num_chars:]


def write_tiny_llama(path: Path, vocab_size: int = 1000) -> Path:
    """A 2-layer random Llama and a word-level tokenizer (``w4`` .. ``w{vocab_size-1}``) saved
    at ``path``: a model vLLM serves with nothing downloaded (the vLLM tests and
    ``scripts/bench_vllm_replay.py``). Seeded, so every call writes the same weights."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(path)
    return path
