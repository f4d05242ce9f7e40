"""A small OpenAI-compatible streaming server on raw asyncio, for bench tests and the client-overhead benchmark.

Modes: ``ok`` streams tokens; ``mixed`` cycles ok, HTTP 500, HTTP 429, a connection dropped mid-stream and a
hang past any client timeout, by request number. Run: ``python fake_server.py --mode ok`` prints ``PORT <n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIXED_CYCLE = ("ok", "http_500", "http_429", "drop", "hang")


@dataclass
class FakeServerOptions:
    mode: str = "ok"
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    tokens_per_chunk: int = 1
    eos_after: int | None = None  # without ignore_eos, stop after this many tokens (an "EOS")
    hang_s: float = 30.0
    send_usage: bool = True  # False mimics a server that ignores stream_options.include_usage


class FakeServer:
    def __init__(self, options: FakeServerOptions) -> None:
        self.options = options
        self.num_posts = 0

    def _behaviour(self) -> str:
        index = self.num_posts
        self.num_posts += 1
        if self.options.mode == "mixed":
            return MIXED_CYCLE[index % len(MIXED_CYCLE)]
        return self.options.mode

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            keep_alive = True
            while keep_alive:
                request_line = await reader.readline()
                if not request_line.strip():
                    break
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    key, _, value = line.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                method, path = request_line.decode("latin-1").split(" ")[:2]
                keep_alive = await self.respond(method, path, body, writer)
        writer.close()

    async def respond(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if method == "GET":
            payload = {"object": "list", "data": [{"id": "fake", "object": "model"}]}
            return await self._json(writer, 200, payload)
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return await self._json(writer, 404, {"error": {"message": f"no route {path}"}})
        behaviour = self._behaviour()
        if behaviour.startswith("http_"):
            status = int(behaviour.split("_")[1])
            return await self._json(
                writer, status, {"error": {"message": "injected failure", "code": status}}
            )
        if behaviour == "hang":
            await asyncio.sleep(self.options.hang_s)
            return False
        return await self._stream(
            writer, json.loads(body), chat=path.endswith("chat/completions"), drop=behaviour == "drop"
        )

    async def _json(self, writer: asyncio.StreamWriter, status: int, payload: dict) -> bool:
        data = json.dumps(payload).encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        writer.write(head.encode() + data)
        await writer.drain()
        return True

    async def _stream(self, writer: asyncio.StreamWriter, request: dict, chat: bool, drop: bool) -> bool:
        opts = self.options
        max_tokens = int(request.get("max_tokens") or 16)
        num_tokens = max_tokens
        if opts.eos_after is not None and not request.get("ignore_eos"):
            num_tokens = min(max_tokens, opts.eos_after)
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head.encode())

        async def send(obj: dict | str) -> None:
            data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()

        def chunk(text: str, finish: str | None) -> dict:
            if chat:
                delta = {"content": text} if text else {}
                return {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
            return {
                "object": "text_completion",
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            }

        if chat:  # OpenAI sends the role alone first; it carries no token
            await send(
                {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
            )
        await asyncio.sleep(opts.first_token_delay_s)
        sent = 0
        while sent < num_tokens:
            step = min(opts.tokens_per_chunk, num_tokens - sent)
            await send(chunk("tok " * step, None))
            sent += step
            if drop and sent >= min(2, num_tokens):
                writer.transport.abort()  # reset mid-stream: no terminating chunk
                return False
            if opts.token_delay_s:
                await asyncio.sleep(opts.token_delay_s)
        await send(chunk("", "length" if num_tokens == max_tokens else "stop"))
        if opts.send_usage and (request.get("stream_options") or {}).get("include_usage"):
            prompt = request.get("prompt") or " ".join(m["content"] for m in request.get("messages", []))
            usage = {"prompt_tokens": len(str(prompt).split()), "completion_tokens": num_tokens}
            usage["total_tokens"] = usage["prompt_tokens"] + num_tokens
            await send({"object": "chunk", "choices": [], "usage": usage})
        await send("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


async def serve(options: FakeServerOptions) -> None:
    server = await asyncio.start_server(FakeServer(options).handle, "127.0.0.1", 0)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def running_fake_server(*flags: str) -> Iterator[str]:
    """Start this file as a subprocess on a free loopback port; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *flags], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("PORT "):
            raise RuntimeError(f"fake server did not start (first line {line!r})")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["ok", "mixed", *MIXED_CYCLE[1:]], default="ok")
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    parser.add_argument("--eos-after", type=int, default=None)
    parser.add_argument("--hang", type=float, default=30.0)
    parser.add_argument("--no-usage", action="store_true")
    args = parser.parse_args()
    options = FakeServerOptions(
        args.mode,
        args.first_token_delay,
        args.token_delay,
        args.tokens_per_chunk,
        args.eos_after,
        args.hang,
        send_usage=not args.no_usage,
    )
    asyncio.run(serve(options))


if __name__ == "__main__":
    main()
