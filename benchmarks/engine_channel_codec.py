"""Which framing for the engine core → API messages: msgspec msgpack (typed Structs) vs pickle, on CPU.

One message = one engine step's outputs (core_messages.CoreOutputs): B requests × 1 new token (decode) plus
stats. Measures encode + decode per message, and the same over a ZeroMQ ipc PUSH/PULL pair (send, receive,
decode) between two processes. Prints a table and writes JSON (date, machine, command).

Usage: python benchmarks/engine_channel_codec.py [--batches 1,16,64,256] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import pickle
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tokenmill.engine.core_messages import CoreOutputs, OutputCodec, SeqDelta


def make_message(batch: int, rng: random.Random) -> CoreOutputs:
    deltas = [SeqDelta(f"cmpl-{rng.getrandbits(128):032x}", 0, [rng.randrange(128256)], None, None, None,
                       False, 0, None) for _ in range(batch)]
    return CoreOutputs([], [], deltas, [float(batch), 0.0, 0.5, 0, 0, 0, 1e5, 2e5, 1e3])


def as_tuples(message: CoreOutputs) -> tuple:
    """The same content as plain tuples, the natural pickle shape."""
    return (message.accepted, message.rejected,
            [(d.request_id, d.index, d.new_token_ids, d.finish_reason, d.stop_reason, d.new_logprobs,
              d.request_finished, d.num_cached_tokens, d.times) for d in message.outputs],
            message.stats, message.dead)


def codecs() -> dict[str, tuple[Any, Any, Any]]:
    codec = OutputCodec()
    return {
        "msgspec": (lambda m: m, codec.encode, codec.decode),
        "pickle": (as_tuples, lambda m: pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL), pickle.loads),
    }


def time_codec(batch: int, name: str, seconds: float = 1.0) -> dict[str, float]:
    shape, encode, decode = codecs()[name]
    message = shape(make_message(batch, random.Random(0)))
    size = len(encode(message))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            decode(encode(message))
        n += 50
    return {"bytes": size, "encode_decode_us": 1e6 * (time.perf_counter() - start) / n}


def _sender(address: str, name: str, batch: int, count: int) -> None:
    import zmq

    shape, encode, _ = codecs()[name]
    message = shape(make_message(batch, random.Random(0)))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(address)
    for _ in range(count):
        sock.send(encode(message), copy=False)
    sock.close(linger=-1)
    ctx.term()


def time_channel(batch: int, name: str, count: int) -> float:
    """Microseconds per message through ZeroMQ ipc from another process, decode included."""
    import zmq

    _, _, decode = codecs()[name]
    with tempfile.TemporaryDirectory() as tmp:
        address = f"ipc://{tmp}/chan"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.bind(address)
        proc = multiprocessing.get_context("spawn").Process(target=_sender, args=(address, name, batch, count))
        proc.start()
        decode(sock.recv())
        start = time.perf_counter()
        for _ in range(count - 1):
            decode(sock.recv())
        elapsed = time.perf_counter() - start
        proc.join()
        sock.close(linger=0)
        ctx.term()
    return 1e6 * elapsed / (count - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--messages", type=int, default=3000, help="messages per channel measurement")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'batch':>6}{'codec':>9}{'bytes':>8}{'enc+dec us':>12}{'zmq ipc us/msg':>16}")
    for batch in [int(b) for b in args.batches.split(",")]:
        for name in ("msgspec", "pickle"):
            row = {"batch": batch, "codec": name, **time_codec(batch, name)}
            row["zmq_ipc_us_per_message"] = time_channel(batch, name, args.messages)
            rows.append(row)
            print(f"{batch:>6}{name:>9}{row['bytes']:>8}{row['encode_decode_us']:>12.1f}"
                  f"{row['zmq_ipc_us_per_message']:>16.1f}")
    record = {
        "benchmark": "engine_channel_codec",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}, "
                   f"load average {os.getloadavg()}",
        "command": shlex.join([sys.executable, *sys.argv]),
        "results": rows,
    }
    out = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    path = out / f"engine_channel_codec_{dt.date.today().isoformat()}.json" if out.is_dir() or not out.suffix else out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
