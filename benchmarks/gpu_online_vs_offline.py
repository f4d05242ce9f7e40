"""Online serving vs the offline engine on exactly the same requests (issue 19's table, one command).

1. writes the preset's synthetic tokenizer (so the client counts tokens exactly as the server does);
2. starts ``tokenmill serve --random-weights PRESET`` as a subprocess on a free port (per --server-modes: the
   engine core in its own process, and/or in a thread as before);
3. ``tokenmill bench serve``'s code from this process (the JSON records the equivalent command line): an untimed warm-up pass, then N requests (inputs U[in·(1−r), in·(1+r)], outputs
   likewise, ignore_eos, greedy, rate inf), optional concurrency points, and (when py-spy is on PATH) a
   separate profiled pass whose hottest frames land in the JSON;
4. stops the server (SIGTERM: it must drain and exit 0) and runs the offline engine (the ``bench throughput``
   path: LLMEngine + run_offline) on the same prompts' token ids and output lengths;
5. samples the server's process tree CPU% (each process's threads too: main, named, the unnamed rest such as an
   OpenMP team) and nvidia-smi GPU busy % during every phase; keeps the engine core's loop account (step() time
   of decode-only vs prompt-carrying steps) and its Triton-compile warnings, and the offline run's compiles;
6. writes one JSON (date, device, command, both sides, ratio) to --out, else $OUT, else benchmarks/results/.

H100:  python benchmarks/gpu_online_vs_offline.py --server-modes thread,process --concurrency 256,64,16
H100, issue 19 re-measure (~6 min):  python benchmarks/gpu_online_vs_offline.py --warmup-prompts 200 \
           --profile-prompts 0 --concurrency 256 --chatbot-rates 10,20,40 --chatbot-prompts 300
H100, the core's torch threads A/B (~4.5 min): the same with --chatbot-rates 20 --chatbot-prompts 200 \
           --ab-server-env OMP_NUM_THREADS=$(python3 -c 'import torch; print(torch.get_num_threads())')
CPU smoke test (a minute):  python benchmarks/gpu_online_vs_offline.py --preset tiny-llama3 --device cpu \
           --num-prompts 16 --input-len 24 --output-len 8 --max-model-len 128
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from resource_sampler import ResourceSampler

REPO_ROOT = Path(__file__).resolve().parents[1]
URL_RE = re.compile(r"serving at (http://[^\s;]+)")
METRIC_STEPS = "tokenmill:engine_steps_total"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=230, help="mean input length (tokens)")
    p.add_argument("--output-len", type=int, default=200, help="mean output length (tokens)")
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in L·[1−r, 1+r]")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--engine-args", default="", help="extra engine flags for both sides, e.g. '--max-num-seqs 512'")
    p.add_argument("--server-args", default="", help="extra flags for the server only")
    p.add_argument("--server-modes", default="process",
                   help="process (engine core in its own process), thread (--no-engine-process, the old layout), "
                        "or both, e.g. thread,process: one server each, same phases")
    p.add_argument("--concurrency", default="", help="also run bench serve at these max concurrencies, e.g. 256,64,16,1")
    p.add_argument("--chatbot-rates", default="",
                   help="also run the chatbot profile's lengths (bench serve --dataset chatbot) at these request "
                        "rates, e.g. 8,16,32: p50/p99 ITL and TPOT, goodput at TTFT <= 500 ms / TPOT <= 50 ms")
    p.add_argument("--chatbot-prompts", type=int, default=300, help="requests per --chatbot-rates point")
    p.add_argument("--burstiness", type=float, default=1.0, help="arrivals of the chatbot points (1 Poisson, 0.5 bursty)")
    p.add_argument("--warmup-prompts", type=int, default=None, help="untimed warm-up requests (default min(N, 300))")
    p.add_argument("--profile-prompts", type=int, default=None,
                   help="requests of the py-spy pass (default min(N, 400); 0 skips it)")
    p.add_argument("--client-processes", type=int, default=4,
                   help="load-generator processes (one sustains ~15k streamed tokens/s: docs/BENCHMARKING.md)")
    p.add_argument("--ab-server-env", default="",
                   help="also start one more server (engine core in its own process) with these environment variables, "
                        "VAR=VALUE[,VAR=VALUE], for the warm-up and rate-inf phases only: an A/B of a setting in the "
                        "same run, e.g. OMP_NUM_THREADS=16 (the core's torch threads before they were set to 1)")
    p.add_argument("--ab-server-args", action="append", default=[],
                   help="also start one more server (engine core in its own process) with these extra flags, for "
                        "every phase (repeatable: one server each): an A/B of a serving option in the same run, e.g. "
                        "'--compilation-config {\"cudagraph_mode\":\"FULL_AND_PIECEWISE\"}'")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--no-step-breakdown", action="store_true",
                   help="skip the offline side's second, instrumented pass (step_breakdown.py: host phases and GPU "
                        "busy/idle per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-start-timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="folder for the JSON (default $OUT, else benchmarks/results)")
    return p.parse_args(argv)


# ---- the server side ----------------------------------------------------------------------------
class Server:
    def __init__(self, args: argparse.Namespace, log_path: Path, extra: list[str],
                 env_overrides: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        command = [sys.executable, "-m", "tokenmill", "serve", "--random-weights", args.preset,
                   "--served-model-name", args.preset, "--host", "127.0.0.1", "--port", "0",
                   "--device", args.device, *engine_flags(args), *shlex.split(args.server_args), *extra]
        self.command = shlex.join(command)
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_overrides or {})}
        if env_overrides:
            self.command = shlex.join(f"{k}={v}" for k, v in env_overrides.items()) + " " + self.command
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_for_url(args.server_start_timeout)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = URL_RE.search(self.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before serving:\n{self.log_tail()}")
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError(f"server did not start within {timeout}s:\n{self.log_tail()}")

    def engine_steps(self) -> float | None:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(METRIC_STEPS)]
        return sum(values) if values else None

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM (drain), then the exit status; None if it had to be killed."""
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            code = self.proc.returncode
        self._log.close()
        return code


def engine_flags(args: argparse.Namespace) -> list[str]:
    flags = shlex.split(args.engine_args)
    if args.max_model_len is not None:
        flags += ["--max-model-len", str(args.max_model_len)]
    return flags


class Client:
    """``tokenmill bench serve``'s own code (dataset, load generator, metrics) run from this process, so each
    phase's start and end are known exactly; ``command`` is the equivalent CLI line."""

    def __init__(self, args: argparse.Namespace, server: Server, tokenizer_dir: Path) -> None:
        from tokenmill.bench.client import Target
        from tokenmill.bench.tokenizer import load_tokenizer

        self.args, self.server, self.tokenizer_dir = args, server, tokenizer_dir
        self.target = Target(base_url=server.url, model=args.preset, ignore_eos=True, temperature=0.0,
                             timeout_s=1200.0)
        self.tokenizer = load_tokenizer(str(tokenizer_dir))

    def command(self, num_prompts: int, seed: int, concurrency: int | None) -> str:
        a = self.args
        line = ["tokenmill", "bench", "serve", "--base-url", self.server.url, "--model", a.preset,
                "--tokenizer", str(self.tokenizer_dir), "--dataset", "random", "--num-prompts", str(num_prompts),
                "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
                "--random-range-ratio", str(a.range_ratio), "--ignore-eos", "--temperature", "0",
                "--request-rate", "inf", "--seed", str(seed), "--client-processes", str(a.client_processes)]
        return shlex.join(line + (["--max-concurrency", str(concurrency)] if concurrency else []))

    def requests(self, num_prompts: int, seed: int) -> list[Any]:
        from tokenmill.bench.datasets import random_dataset

        a = self.args
        return random_dataset(num_prompts, a.input_len, a.output_len, a.range_ratio, self.tokenizer, seed)

    def chatbot_requests(self, num_prompts: int, seed: int) -> list[Any]:
        from tokenmill.bench.datasets import chatbot_dataset

        return chatbot_dataset(num_prompts, self.tokenizer, seed)

    def run(self, requests: list[Any], seed: int, concurrency: int | None = None, rate: float | None = None,
            command: str | None = None) -> dict[str, Any]:
        import asyncio

        from tokenmill.bench.loadgen import LoadConfig, run_loads
        from tokenmill.bench.metrics import SLO, summarize

        load = LoadConfig(max_concurrency=concurrency, seed=seed, progress=False,
                          **({"request_rate": rate, "burstiness": self.args.burstiness} if rate else {}))
        steps_before = self.server.engine_steps()
        [result] = asyncio.run(run_loads(self.target, requests, [load], self.args.client_processes))
        summary = summarize(result.records, SLO(ttft_ms=500, tpot_ms=50) if rate else None, result.num_not_sent)
        steps = None if steps_before is None else self.server.engine_steps() - steps_before
        return {
            "command": command or self.command(len(requests), seed, concurrency),
            "load": load.describe(), "records": result.records,  # for the HTML report (not in the JSON)
            "summary": summary,
            "engine_steps": steps,
            "ms_per_engine_step": 1e3 * summary["duration_s"] / steps if steps else None,
        }


def compact(run: dict[str, Any]) -> dict[str, Any]:
    s = run["summary"]
    return {
        "num_completed": s["num_completed"], "num_failed": s["num_failed"], "duration_s": s["duration_s"],
        "output_tok_s": s["output_throughput"], "total_tok_s": s["total_token_throughput"],
        "median_tpot_ms": (s.get("tpot_ms") or {}).get("median"), "p99_tpot_ms": (s.get("tpot_ms") or {}).get("p99"),
        "median_ttft_ms": (s.get("ttft_ms") or {}).get("median"), "p99_itl_ms": (s.get("itl_ms") or {}).get("p99"),
        "median_itl_ms": (s.get("itl_ms") or {}).get("median"),
        "engine_steps": run["engine_steps"], "ms_per_engine_step": run["ms_per_engine_step"],
        "request_rate": s.get("request_throughput"), "goodput": s.get("goodput"),
        "p99_ttft_ms": (s.get("ttft_ms") or {}).get("p99"),
        **chunk_shape(run["records"]),
    }


def chunk_shape(records: list[Any]) -> dict[str, float | None]:
    """Whether slow inter-token gaps are late chunks or merged ones: text chunks per output token (1.0: every
    token streamed alone) and the share of gaps over twice the median gap."""
    done = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in done)
    gaps = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    median = statistics.median(gaps) if gaps else None
    return {
        "chunks_per_token": sum(len(r.token_times) for r in done) / tokens if tokens else None,
        "itl_share_over_2x_median": sum(g > 2 * median for g in gaps) / len(gaps) if median else None,
    }


def _turn_ms(turn: dict[str, Any]) -> dict[str, Any]:
    """A traced turn for the JSON: its parts in milliseconds, without the absolute start."""
    parts = ("idle", "inbox", "step", "send")
    return {k: round(1e3 * v, 2) if k in parts else v for k, v in turn.items() if k != "start"}


def trace_summary(trace_path: Path, windows: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The engine core's step turns (TOKENMILL_STEP_TRACE) inside each client phase: step time by kind, the gap
    between successive turn starts (the cadence every running request sees), and the slowest turns' parts."""
    if not trace_path.is_file():
        return {"error": f"no step trace at {trace_path}"}
    turns = [json.loads(line) for line in trace_path.read_text().splitlines() if line.strip()]
    out: dict[str, Any] = {}
    for name, (start, end) in windows.items():
        inside = [t for t in turns if start <= t["start"] <= end]
        if len(inside) < 2:
            continue
        gaps = [(b["start"] - a["start"], a) for a, b in zip(inside, inside[1:], strict=False)]

        def pct(values: list[float], q: float) -> float:
            ordered = sorted(values)
            return 1e3 * ordered[int(q * (len(ordered) - 1))]

        by_kind = {}
        for kind in ("decode", "prompt"):
            steps = [t["step"] for t in inside if t["kind"] == kind]
            if steps:
                by_kind[kind] = {"count": len(steps), "step_p50_ms": pct(steps, 0.5), "step_p99_ms": pct(steps, 0.99),
                                 "tokens_p50": sorted(t["tokens"] for t in inside if t["kind"] == kind)[
                                     len(steps) // 2]}
        slowest = sorted(gaps, key=lambda g: g[0], reverse=True)[:12]
        out[name] = {
            "turns": len(inside), "by_kind": by_kind,
            "turn_gap_p50_ms": pct([g for g, _ in gaps], 0.5), "turn_gap_p99_ms": pct([g for g, _ in gaps], 0.99),
            "slowest_turns": [{"gap_ms": round(1e3 * g, 2), **_turn_ms(turn)} for g, turn in slowest],
        }
    return out


def py_spy_profile(pid: int, seconds: float, path: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--threads", "--rate", "200",
                             "--duration", str(int(seconds)), "--format", "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def hottest_frames(raw_path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares of the hottest frames in py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        process = re.match(r"process (\d+)", frames[0])
        thread = next((f for f in frames if f.startswith("thread")), "?")
        threads[f"pid {process.group(1)} {thread}" if process else thread] += n
        self_counts[frames[-1]] += n
        for frame in set(frames):
            incl_counts[frame] += n
    share = (lambda c: [[f, round(100 * k / total, 2)] for f, k in c.most_common(top)]) if total else (lambda c: [])
    return {"samples": total, "threads_percent": share(threads), "self_percent": share(self_counts),
            "inclusive_percent": share(incl_counts)}


# ---- the offline side ---------------------------------------------------------------------------
def run_offline_side(args: argparse.Namespace, tokenizer_dir: Path) -> dict[str, Any]:
    from tokenmill.bench.datasets import random_dataset
    from tokenmill.bench.throughput import run_offline, step_summary, warm_up, warm_up_mixed_steps
    from tokenmill.bench.tokenizer import load_tokenizer
    from tokenmill.bench.workloads import OfflineRequest
    from tokenmill.config import EngineConfig
    from tokenmill.engine.cli import add_engine_arguments, engine_kwargs
    from tokenmill.engine.gc_heap import freeze_startup_heap
    from tokenmill.engine.llm_engine import LLMEngine

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    engine_args = parser.parse_args(["--random-weights", args.preset, "--device", args.device, *engine_flags(args)])
    engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs(engine_args)), stream_outputs=False)
    freeze_startup_heap()  # the server's engine process does the same
    # The very prompts bench serve sent (same generator, seed and tokenizer), encoded as the server does.
    hf = load_tokenizer(str(tokenizer_dir))
    dataset = random_dataset(args.num_prompts, args.input_len, args.output_len, args.range_ratio, hf, args.seed)
    requests = [OfflineRequest(engine.tokenizer.encode(r.prompt), r.output_len) for r in dataset]
    vocab = engine.model.spec.vocab_size
    warm_up(engine, 4, vocab, temperature=0.0)
    if engine.config.model.device.startswith("cuda"):
        warm_up_mixed_steps(engine, vocab, temperature=0.0)
    result = run_offline(engine, requests, ignore_eos=True, temperature=0.0)
    print(f"offline run: {result.output_tok_s:.0f} output tok/s", flush=True)
    per_step = step_summary(result)
    del per_step["steps"]
    side = {
        "output_tok_s": result.output_tok_s, "total_tok_s": result.total_tok_s, "elapsed_s": result.elapsed_s,
        "num_requests": result.num_requests, "prompt_tokens": result.prompt_tokens,
        "output_tokens": result.output_tokens, "engine_steps": len(result.steps),
        "ms_per_engine_step": 1e3 * result.elapsed_s / max(1, len(result.steps)), "per_step": per_step,
        "kv_cache_tokens": engine.num_kv_cache_tokens,
        "async_scheduling": engine.async_scheduling,
        "jit_compiles_in_timed_run": result.jit_compiles,
        "torch_threads": __import__("torch").get_num_threads(),
    }
    if not args.no_step_breakdown:
        # The same requests again with every step's host phases timed and CUDA events around each launch:
        # why the GPU is idle (host-bound phases, gaps between steps) without touching the headline run.
        from step_breakdown import StepBreakdown

        breakdown = StepBreakdown(engine)
        t0 = time.perf_counter()
        again = run_offline(engine, requests, ignore_eos=True, temperature=0.0, id_prefix="b")
        side["step_breakdown"] = breakdown.summary(time.perf_counter() - t0)
        side["step_breakdown"]["output_tok_s"] = again.output_tok_s
        breakdown.remove()
    return side


def parse_env(value: str) -> dict[str, str]:
    pairs = [item.strip() for item in value.split(",") if item.strip()]
    if any("=" not in item for item in pairs):
        raise ValueError(f"--ab-server-env needs VAR=VALUE[,VAR=VALUE]; got {value!r}")
    return dict(item.split("=", 1) for item in pairs)


def run_online(args: argparse.Namespace, mode: str, tokenizer_dir: Path, work: Path, stem: Path,
               env_overrides: dict[str, str] | None = None, extra_args: list[str] | None = None) -> dict[str, Any]:
    """Start a server (``mode`` "process": engine core in its own process; "thread": --no-engine-process),
    run every client phase against it, stop it with SIGTERM. With ``env_overrides`` (the A/B server) only the
    warm-up and rate-inf phases run; ``extra_args`` (server flags) keep every phase."""
    if mode not in ("process", "thread"):
        raise ValueError(f"--server-modes entries must be process or thread; got {mode!r}")
    extra = (["--no-engine-process"] if mode == "thread" else []) + list(extra_args or [])
    t_start = time.monotonic()
    label = mode + ("_ab_args" if extra_args else "")
    label += ("_" + "_".join(f"{k}={v}" for k, v in env_overrides.items())) if env_overrides else ""
    trace_path = work / f"steps_{label}.jsonl"
    server = Server(args, work / f"server_{label}.log", extra, {**(env_overrides or {}),
                                                                  "TOKENMILL_STEP_TRACE": str(trace_path)})
    side: dict[str, Any] = {"server_command": server.command, "server_start_s": time.monotonic() - t_start}
    sampler = ResourceSampler({"server": server.proc.pid, "client": os.getpid()})
    online: dict[str, Any] = {}
    windows: dict[str, tuple[float, float]] = {}  # phase -> perf_counter span (the core's trace clock)
    reports: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # sweep axis -> its phases
    try:
        client = Client(args, server, tokenizer_dir)

        def phase(name: str, num_prompts: int, seed: int, concurrency: int | None = None,
                  on_start: Any = None, rate: float | None = None) -> dict[str, Any]:
            # Built before the phase starts: not measured.
            requests = client.chatbot_requests(num_prompts, seed) if rate else client.requests(num_prompts, seed)
            if on_start is not None:
                on_start()
            sampler.mark(name)
            command = None
            if rate:
                command = shlex.join(["tokenmill", "bench", "serve", "--base-url", server.url, "--model", args.preset,
                                      "--tokenizer", str(tokenizer_dir), "--dataset", "chatbot", "--ignore-eos",
                                      "--num-prompts", str(num_prompts), "--seed", str(seed), "--request-rate",
                                      f"{rate:g}", "--burstiness", str(args.burstiness), "--slo", "ttft=500,tpot=50"])
            started = time.perf_counter()
            result = client.run(requests, seed, concurrency, rate, command)
            windows[name] = (started, time.perf_counter())
            sampler.end(name)
            online[name] = compact(result)
            if concurrency or rate:
                reports.setdefault("concurrency" if concurrency else "request_rate", []).append((name, result))
            return result

        warm = args.warmup_prompts if args.warmup_prompts is not None else min(args.num_prompts, 300)
        if warm:
            phase("warmup", warm, args.seed + 1)
        main_run = phase("rate_inf", args.num_prompts, args.seed)
        side["bench_command"] = main_run["command"]
        if env_overrides:
            return side
        for c in [int(v) for v in args.concurrency.split(",") if v.strip()]:
            phase(f"concurrency_{c}", min(args.num_prompts, max(32, 4 * c)), args.seed, c)
        for rate in [float(v) for v in args.chatbot_rates.split(",") if v.strip()]:
            phase(f"chatbot_rate_{rate:g}", args.chatbot_prompts, args.seed + 3, rate=rate)
        n_prof = args.profile_prompts if args.profile_prompts is not None else min(args.num_prompts, 400)
        if n_prof and shutil.which("py-spy"):
            raw = work / f"pyspy_{mode}.txt"
            # Sample ~90% of the expected run time, so the profile holds the loaded server only.
            seconds = max(3.0, 0.9 * main_run["summary"]["duration_s"] * n_prof / args.num_prompts)
            spies: list[subprocess.Popen | None] = []
            phase("profiled", n_prof, args.seed + 2,
                  on_start=lambda: spies.append(py_spy_profile(server.proc.pid, seconds, raw)))
            _, err = spies[0].communicate(timeout=120) if spies[0] is not None else ("", "")
            if raw.is_file():
                side["py_spy"] = hottest_frames(raw)
                shutil.copy(raw, stem.with_name(stem.name + "_pyspy.txt"))
            else:
                side["py_spy"] = {"error": err[-2000:]}
        elif n_prof:
            side["py_spy"] = {"error": "py-spy is not on PATH"}
    finally:
        sampler.stop()
        side["exit_code_after_sigterm"] = server.stop()
        side["log_tail"] = server.log_tail(15)
        # The engine core's own account of its loop (step vs channel vs idle, step() time by kind of step),
        # logged when it exits, and each Triton compile while serving (logged as it happens).
        log_lines = server.log_path.read_text(errors="replace").splitlines()
        core_loop = [line for line in log_lines if "engine core loop:" in line]
        side["core_loop"] = core_loop[-1] if core_loop else None
        side["core_jit_compiles"] = [line for line in log_lines if "Triton compiled" in line][:50]
        side["core_threads"] = next((line for line in log_lines if "torch CPU threads" in line), None)
        side["phases"] = online
        side["step_trace"] = trace_summary(trace_path, windows)
        side["resources"] = sampler.summary()
        side["html_reports"] = [str(write_report(stem, axis, phases, server.url, args.preset))
                                for axis, phases in reports.items()]
    return side


def write_report(stem: Path, axis: str, phases: list[tuple[str, dict[str, Any]]], url: str, model: str) -> Path:
    """``bench serve``'s HTML report (latency percentiles against load, CDFs, timeline) of one sweep's phases."""
    from tokenmill.bench.html_report import render_serve_report
    from tokenmill.bench.results import make_document, make_metadata, make_run

    runs = [make_run(name, result["load"], result["summary"], None) for name, result in phases]
    values = [run["load"]["max_concurrency" if axis == "concurrency" else "request_rate"] for run in runs]
    meta = make_metadata({"base_url": url, "model": model}, {"commands": [r["command"] for _, r in phases]},
                         f"{stem.name} {axis} sweep")
    document = make_document(meta, {"param": axis, "values": values}, runs)
    path = stem.with_name(f"{stem.name}_{axis}.html")
    path.write_text(render_serve_report(document, [r["records"] for _, r in phases]), encoding="utf-8")
    return path


def device_description(device: str) -> str:
    import torch

    if torch.cuda.is_available() and device != "cpu":
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
    except OSError:
        return None
    return done.stdout.strip() or None


def server_stack() -> dict[str, str | None]:
    """Versions of what the API process runs on (uvicorn uses uvloop and httptools only when they are installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("uvicorn", "uvloop", "httptools", "h11", "fastapi", "pydantic", "pyzmq", "msgspec"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def output_dir(args: argparse.Namespace) -> Path:
    return Path(args.out or os.environ.get("OUT") or REPO_ROOT / "benchmarks" / "results")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tokenmill.model.synthetic_tokenizer import save_preset_tokenizer

    out = output_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC)
    record: dict[str, Any] = {
        "benchmark": "gpu_online_vs_offline", "date": stamp.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "config": vars(args),
        "git_commit": git_commit(), "server_stack": server_stack(),
    }
    path = out / f"online_vs_offline_{args.preset}_{stamp.strftime('%Y%m%dT%H%M%S')}.json"
    with tempfile.TemporaryDirectory(prefix="tokenmill-online-") as tmp:
        work = Path(tmp)
        tokenizer_dir = save_preset_tokenizer(args.preset, work / "tokenizer")
        record["online"] = {}
        runs = [(m.strip(), m.strip(), None, []) for m in args.server_modes.split(",") if m.strip()]
        if args.ab_server_env:
            env = parse_env(args.ab_server_env)
            runs.append(("process " + " ".join(f"{k}={v}" for k, v in env.items()), "process", env, []))
        runs += [(f"process {flags}", "process", None, shlex.split(flags)) for flags in args.ab_server_args]
        for index, (name, mode, env, extra) in enumerate(runs):
            stem = out / f"{path.stem}_{mode}{f'_ab{index}' if env or extra else ''}"
            try:
                record["online"][name] = run_online(args, mode, tokenizer_dir, work, stem, env, extra)
            except Exception as exc:  # noqa: BLE001 - keep the other mode and the offline side
                record["online"][name] = {"error": f"{type(exc).__name__}: {exc}"[-6000:]}
            path.write_text(json.dumps(record, indent=2) + "\n")  # partial results survive a later failure
        if not args.skip_offline:
            offline_sampler = ResourceSampler({"offline": os.getpid()})
            offline_sampler.mark("offline")
            record["offline"] = run_offline_side(args, tokenizer_dir)
            offline_sampler.end("offline")
            offline_sampler.stop()
            record["offline"]["resources_incl_load"] = offline_sampler.summary()["offline"]
            record["online_over_offline"] = {
                mode: side["phases"]["rate_inf"]["output_tok_s"] / record["offline"]["output_tok_s"]
                for mode, side in record["online"].items() if "phases" in side
            }
    record["device"] = device_description(args.device)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print_table(record)
    print(f"wrote {path}")
    return 0


def print_table(record: dict[str, Any]) -> None:
    print(f"\n{record['device']}  preset {record['config']['preset']}")
    print(f"{'run':<30}{'out tok/s':>11}{'med TPOT ms':>13}{'p99 ITL ms':>12}{'ms/step':>9}{'server CPU%':>13}"
          f"{'GPU busy%':>11}{'goodput':>9}")
    for mode, side in record["online"].items():
        if "error" in side:
            print(f"{mode}: FAILED: {side['error'][:500]}")
            continue
        if side.get("core_loop"):
            print(f"{mode}: {side['core_loop'].split('tokenmill.engine.core: ')[-1]}")
        if side.get("core_threads"):
            print(f"{mode}: {side['core_threads'].split('tokenmill.engine.core: ')[-1]}")
        if side.get("core_jit_compiles"):
            print(f"{mode}: {len(side['core_jit_compiles'])} Triton compile(s) while serving, first: "
                  f"{side['core_jit_compiles'][0].split('tokenmill.engine.core: ')[-1][:200]}")
        threads = side["resources"].get("rate_inf", {}).get("thread_cpu_percent", {})
        for proc, groups in threads.items():
            if proc.startswith("server"):
                print(f"{mode} rate_inf threads {proc}: " + ", ".join(
                    f"{g} {r['cpu_percent']:.0f}% ({r['threads']})" for g, r in groups.items()))
        for name, row in side["phases"].items():
            phase = side["resources"].get(name, {})
            cpu = ", ".join(f"{v['mean']:.0f}" for k, v in phase.get("cpu_percent", {}).items()
                            if k.startswith("server")) or "-"
            print(f"{mode + ' ' + name:<30}{row['output_tok_s']:>11.0f}{_fmt(row['median_tpot_ms']):>13}"
                  f"{_fmt(row.get('p99_itl_ms')):>12}{_fmt(row['ms_per_engine_step']):>9}{cpu:>13}"
                  f"{_fmt(phase.get('gpu_busy_percent_mean')):>11}{_fmt(row.get('goodput')):>9}")
    if "offline" in record:
        off = record["offline"]
        gpu = off["resources_incl_load"].get("gpu_busy_percent_mean")
        print(f"{'offline':<30}{off['output_tok_s']:>11.0f}{'-':>13}{'-':>12}{_fmt(off['ms_per_engine_step']):>9}"
              f"{'-':>13}{_fmt(gpu):>11}{'-':>9}")
        for mode, ratio in record["online_over_offline"].items():
            print(f"online ({mode}) / offline = {ratio:.3f}")
        if "step_breakdown" in off:
            from step_breakdown import print_summary

            print(f"offline step breakdown (instrumented pass, {off['step_breakdown']['output_tok_s']:.0f} out tok/s):")
            print_summary(off["step_breakdown"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
