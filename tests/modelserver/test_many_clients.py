"""Many concurrent clients on the sentiment task endpoint of the real server: every request answered correctly.

Bounded (64 clients x 2 requests); the throughput side of this lives in benchmarks/modelserver_scaling.py.
"""

from __future__ import annotations

import asyncio

import httpx

CLIENTS = 64
REQUESTS_EACH = 2
TEXTS = {"I absolutely loved this, wonderful!": "positive", "Awful, a complete waste of money.": "negative"}


def test_sixty_four_concurrent_clients_all_succeed(server):
    async def client(http: httpx.AsyncClient, i: int) -> list[tuple[int, str, str]]:
        out = []
        for j in range(REQUESTS_EACH):
            text = list(TEXTS)[(i + j) % 2]
            reply = await http.post(f"http://{server}/v1/sentiment/sentiment", json={"text": text})
            label = reply.json()["results"][0]["label"] if reply.status_code == 200 else reply.text
            out.append((reply.status_code, TEXTS[text], label))
        return out

    async def main():
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*[client(http, i) for i in range(CLIENTS)])

    results = [row for rows in asyncio.run(main()) for row in rows]
    assert len(results) == CLIENTS * REQUESTS_EACH
    assert all(status == 200 for status, _, _ in results)
    assert all(expected == label for _, expected, label in results)
