"""Issue 25's reliability figures, reproduced on loopback (bounded; CPU is enough):

1. fuzz: N schema-driven requests (tests/server/schema_fuzz.py: every field, Unicode's odd corners) against a
   real `tokenmill serve` on one keep-alive connection -> count of 5xx (goal 0);
2. disconnect storm: S streamed requests at concurrency C against `tokenmill serve`, every tenth client hanging
   up after its first chunk -> count of 5xx (goal 0) and KV cache usage once idle (goal back to 0);
3. drain: SIGTERM with `--drain-timeout 0` while streams run -> error events seen, exit status (goal non-zero);
4. crash loop: a gateway pool whose replica exits with status 2 -> latency of the 503 that names it, /health;
5. kill: a gateway over 2 real replicas, R requests (half streamed) at concurrency C, one replica SIGKILLed
   mid-load -> lost requests (non-200 or a stream without [DONE]; goal 0) and resumed streams;
6. kill_fallback: the same with a fallback pool configured (pool m, 2 replicas, fallback f, 1 replica).

    python benchmarks/reliability.py --model DIR [--fuzz 5000] [--storm 2000] [--requests 300] [--concurrency 20]
Without --model it uses the embedded SmolLM2. Writes benchmarks/results/reliability-<UTC date>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "server"), str(REPO / "tests" / "gateway")]

from gateway_helpers import metric_value, run_gateway, wait_ready, wait_until  # noqa: E402
from server_process import ServerProcess  # noqa: E402

from tokenmill.model.loader import embedded_model_path  # noqa: E402

SERVE_ARGS = ("--max-model-len", "512", "--served-model-name", "m")


def run_fuzz(client: httpx.Client, strategies, path: str, count: int, statuses: dict[str, int]) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from schema_fuzz import encode

    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(body=strategies.request_body(path))
    def send(body: object) -> None:
        status = client.post(path, content=encode(body), headers={"content-type": "application/json"}).status_code
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    send()


def fuzz(model: Path, count: int, work: Path) -> dict:
    from schema_fuzz import SchemaStrategies

    server = ServerProcess(model, work / "fuzz-server.log", *SERVE_ARGS)
    statuses: dict[str, int] = {}
    try:
        with server.client() as client:
            strategies = SchemaStrategies(client.get("/openapi.json").json(), hints={"model": "m"})
            for path in ("/v1/completions", "/v1/chat/completions"):
                run_fuzz(client, strategies, path, count // 2, statuses)
            alive = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code
    finally:
        server.stop()
    errors = sum(n for s, n in statuses.items() if s.startswith("5"))
    return {"requests": sum(statuses.values()), "statuses": statuses, "5xx": errors, "next_request_status": alive}


def disconnect_storm(model: Path, requests: int, concurrency: int, work: Path) -> dict:
    server = ServerProcess(model, work / "storm-server.log", *SERVE_ARGS)
    statuses: dict[str, int] = {}
    hung_up = [0]

    def one(i: int) -> None:
        body = {"model": "m", "prompt": f"Story {i}: once upon a time", "max_tokens": 64, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as resp:
            statuses[str(resp.status_code)] = statuses.get(str(resp.status_code), 0) + 1
            for _ in resp.iter_lines():
                if i % 10 == 0:  # hang up mid-stream: the context manager closes the connection
                    hung_up[0] += 1
                    return

    try:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(one, i) for i in range(requests)]:
                future.result()

        def usage() -> float:
            return metric_value(httpx.get(server.url + "/metrics", timeout=10).text, "tokenmill:kv_cache_usage_perc")

        def idle() -> bool:
            text = httpx.get(server.url + "/metrics", timeout=10).text
            return metric_value(text, "tokenmill:num_requests_running") == 0 and usage() == 0

        wait_until(idle, 60, "the server idle with its KV cache free", poll_s=0.2)
        kv_after = usage()
    finally:
        server.stop()
    errors = sum(n for s, n in statuses.items() if s.startswith("5"))
    return {"requests": requests, "concurrency": concurrency, "hung_up": hung_up[0], "statuses": statuses,
            "5xx": errors, "kv_cache_usage_after": kv_after}


def drain(model: Path, work: Path) -> dict:
    server = ServerProcess(model, work / "drain-server.log", *SERVE_ARGS, "--max-num-seqs", "1",
                           "--drain-timeout", "0")  # fmt: skip
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            def stream(_: int) -> str:
                with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as resp:
                    return [line for line in resp.iter_lines() if line.startswith("data: ")][-1]

            futures = [pool.submit(stream, i) for i in range(3)]
            time.sleep(1.0)  # all three accepted: one running, two waiting (max-num-seqs 1)
            server.terminate()
            last = [f.result() for f in futures]
        code = server.wait(60)
    finally:
        server.stop()
    cut = sum('"drain_timeout"' in line for line in last)
    return {"streams": 3, "ended_with_error_event": cut, "exit_status": code,
            "log_says_drain_timeout": "drain timeout" in server.log()}  # fmt: skip


def crash_loop(work: Path) -> dict:
    broken = ["{python}", "-c", "import sys; print('error: no CUDA GPU'); sys.exit(2)"]
    config = {"models": [{"name": "broken", "kind": "managed", "model": "x", "command": broken}]}
    with run_gateway(config, work / "crash") as gw:
        wait_until(lambda: gw.pool("broken")["state"] == "failed", 60, "pool marked failed")
        start = time.perf_counter()
        resp = httpx.post(f"{gw.url}/v1/completions", json={"model": "broken", "prompt": "x"}, timeout=300)
        latency = time.perf_counter() - start
        health = httpx.get(f"{gw.url}/health", timeout=10)
    return {"status": resp.status_code, "latency_s": round(latency, 4), "message": resp.json()["error"]["message"],
            "health_status": health.status_code, "unavailable": health.json()["unavailable"]}  # fmt: skip


def kill_replica(model: Path, requests: int, concurrency: int, work: Path, fallback: bool = False) -> dict:
    """SIGKILL one of pool m's 2 replicas mid-load; with ``fallback``, m also has a fallback pool f (1 replica)."""
    args = ["--device", "cpu", "--max-model-len", "512", "--max-num-seqs", "16"]
    pool = {"name": "m", "kind": "managed", "model": str(model), "replicas": 2, "args": args,
            "startup_timeout_s": 300}  # fmt: skip
    pools = [pool]
    if fallback:
        pool["fallback"] = "f"
        pools.append({**pool, "name": "f", "replicas": 1, "fallback": None})
    config = {"health": {"interval_s": 1.0, "failure_threshold": 2}, "models": pools}
    with run_gateway(config, work / ("kill-fallback" if fallback else "kill")) as gw:
        replicas = wait_ready(gw, "m", 2, 300)
        if fallback:
            wait_ready(gw, "f", 1, 300)
        done = [0]

        def one(i: int) -> bool | str:
            """True, or what went wrong (kept in the result: a lost request must be explained)."""
            body = {"model": "m", "prompt": f"Story {i}: once upon a time", "max_tokens": 160, "ignore_eos": True}
            try:
                if i % 2:
                    resp = httpx.post(f"{gw.url}/v1/completions", json=body, timeout=300)
                    return resp.status_code == 200 or f"{resp.status_code}: {resp.text[:300]}"
                with httpx.stream("POST", f"{gw.url}/v1/completions", json={**body, "stream": True},
                                  timeout=300) as resp:  # fmt: skip
                    lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
                    return (resp.status_code == 200 and lines[-1] == "data: [DONE]") or (
                        f"stream {resp.status_code}: {lines[-1][:300] if lines else 'no events'}")
            except httpx.HTTPError as err:
                return f"{type(err).__name__}: {err}"
            finally:
                done[0] += 1

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(one, i) for i in range(requests)]
            wait_until(lambda: done[0] >= requests // 5, 600, "a fifth of the requests", poll_s=0.05)
            victim = next(r for r in gw.pool("m")["replicas"] if r["slot"] == replicas[0]["slot"])
            os.kill(replicas[0]["pid"], signal.SIGKILL)
            ok = [f.result() for f in futures]
        metrics = gw.metrics()
    lost = [failure for failure in ok if failure is not True]
    return {"requests": requests, "concurrency": concurrency, "fallback_pool": fallback,
            "in_flight_on_killed_replica": victim["outstanding"], "lost": len(lost),
            "lost_detail": lost[:20],
            "streams_resumed": metric_value(metrics, "tokenmill:gateway_stream_resumes_total", outcome="resumed"),
            "streams_failed": metric_value(metrics, "tokenmill:gateway_stream_resumes_total", outcome="failed"),
            "retries": metric_value(metrics, "tokenmill:gateway_retries_total"),
            "fallbacks": metric_value(metrics, "tokenmill:gateway_fallbacks_total")}  # fmt: skip


def print_table(results: dict) -> None:
    print(f"{'figure':<12} result")
    if "fuzz" in results:
        print(f"{'fuzz':<12} {results['fuzz']['requests']} requests, 5xx={results['fuzz']['5xx']}")
    if "disconnect_storm" in results:
        storm = results["disconnect_storm"]
        print(f"{'storm':<12} {storm['requests']} streams ({storm['hung_up']} hung up), 5xx={storm['5xx']}, "
              f"KV usage after {storm['kv_cache_usage_after']}")
    if "drain" in results:
        print(f"{'drain':<12} {results['drain']['ended_with_error_event']}/3 error events, "
              f"exit {results['drain']['exit_status']}")
    if "crash_loop" in results:
        print(f"{'crash loop':<12} {results['crash_loop']['status']} in {results['crash_loop']['latency_s']} s, "
              f"/health {results['crash_loop']['health_status']}")
    for name in ("kill", "kill_fallback"):
        if name in results:
            print(f"{name:<12} lost {results[name]['lost']}/{results[name]['requests']}, "
                  f"resumed streams {results[name]['streams_resumed']}, fallbacks {results[name]['fallbacks']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    parser.add_argument("--fuzz", type=int, default=5000)
    parser.add_argument("--storm", type=int, default=2000, help="streamed requests in the disconnect storm")
    parser.add_argument("--storm-concurrency", type=int, default=200)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--figures", type=lambda text: text.split(","),
                        default=["fuzz", "disconnect_storm", "drain", "crash_loop", "kill", "kill_fallback"],
                        help="comma list of the figures to run (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    model = args.model or embedded_model_path()
    with tempfile.TemporaryDirectory(prefix="tokenmill-reliability-") as tmp:
        work = Path(tmp)
        for sub in ("crash", "kill", "kill-fallback"):
            (work / sub).mkdir()
        runs = {"fuzz": lambda: fuzz(model, args.fuzz, work),
                "disconnect_storm": lambda: disconnect_storm(model, args.storm, args.storm_concurrency, work),
                "drain": lambda: drain(model, work), "crash_loop": lambda: crash_loop(work),
                "kill": lambda: kill_replica(model, args.requests, args.concurrency, work),
                "kill_fallback": lambda: kill_replica(model, args.requests, args.concurrency, work, fallback=True)}
        unknown = set(args.figures) - set(runs)
        if unknown:
            parser.error(f"--figures: unknown {sorted(unknown)}; choose from {list(runs)}")
        results = {name: run() for name, run in runs.items() if name in args.figures}
    print_table(results)
    date = dt.datetime.now(dt.UTC)
    record = {"date": date.isoformat(timespec="seconds"), "device": f"{platform.machine()} {platform.processor()} "
              f"({os.cpu_count()} CPUs), CPU only", "command": shlex.join([sys.executable, *sys.argv]),
              "model": str(model), "results": results}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    partial = "" if set(results) == set(runs) else "-" + "-".join(results)  # a subset never overwrites a full run
    path = args.out / f"reliability-{date:%Y%m%d}{partial}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
