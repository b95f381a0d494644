"""A fake OpenAI-compatible completions server on 127.0.0.1 for the replay tests: streams
``max_tokens`` words per request (SSE, one chunk per token, a usage chunk, ``[DONE]``), logs what it
received and when, and fails on purpose where the test's plan says so.

Stdlib asyncio in a thread of its own, so a test drives the replay's event loop while this one
serves; every wait in it is bounded (``hang_s``), and ``stop()`` closes it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

MODES = ("ok", "500", "400", "drop", "hang")
"""``500``/``400``: that HTTP error; ``drop``: close the connection unanswered; ``hang``: stream one
token then stall ``hang_s`` and close without ``[DONE]`` (the client's timeout fires first)."""


@dataclass
class Received:
    tag: str | None
    attempt: int
    mode: str
    body: dict
    received_s: float
    done_s: float = float("nan")
    output: str = ""


@dataclass
class FakeServer:
    token_delay_s: float = 0.002
    hang_s: float = 2.0
    plan: dict[str, list[str]] = field(default_factory=dict)
    """tree tag -> the mode of each attempt in turn (then ``ok``)."""
    log: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0

    def start(self) -> str:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start in 10 s")
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def received(self, tag: str) -> list[Received]:
        return [r for r in self.log if r.tag == tag]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {
            k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
        }
        body = json.loads(await reader.readexactly(int(headers.get("content-length", 0))))
        if method != "POST" or path != "/v1/completions":
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        tag = (body.get("vllm_xargs") or {}).get("servegym_tree")
        attempt = len(self.received(tag)) if tag else 0
        plan = self.plan.get(tag, []) if tag else []
        mode = plan[attempt] if attempt < len(plan) else "ok"
        record = Received(tag, attempt, mode, body, time.perf_counter())
        self.log.append(record)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._respond(writer, body, record)
        finally:
            self.in_flight -= 1

    async def _respond(self, writer: asyncio.StreamWriter, body: dict, record: Received) -> None:
        if record.mode == "drop":
            return
        if record.mode in ("500", "400"):
            payload = json.dumps({"error": {"message": f"planned {record.mode}"}}).encode()
            status = "500 Internal Server Error" if record.mode == "500" else "400 Bad Request"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        num_tokens = int(body["max_tokens"])
        words = [f" r{len(self.log)}t{k}" for k in range(num_tokens)]
        for k, word in enumerate(words):
            await asyncio.sleep(self.token_delay_s)
            writer.write(f"data: {json.dumps({'choices': [{'index': 0, 'text': word}]})}\n\n".encode())
            await writer.drain()
            if record.mode == "hang" and k == 0:
                await asyncio.sleep(self.hang_s)
                return
        usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": num_tokens}
        writer.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        await writer.drain()
        record.done_s = time.perf_counter()
        record.output = "".join(words)
