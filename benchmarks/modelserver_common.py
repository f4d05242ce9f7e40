"""Shared pieces of the modelserver benchmarks: a repository built once, a server subprocess, a load generator.

Requests are KServe v2 binary-tensor infer calls (what tritonclient sends), generated with asyncio + httpx.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from tokenmill.modelserver.loadgen import (  # noqa: F401 - re-exported for the benchmarks
    LoadResult,
    RawHttpConnection,
    drive,
    free_port,
    summarize,
)
from tokenmill.modelserver.loadgen import ServerProcess as Server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.machine()} {os.cpu_count()} CPUs{gpu}, {platform.platform()}, python {platform.python_version()}"


def ensure_repository(path: Path, models: tuple[str, ...], hf_dir: Path | None = None) -> Path:
    """Export the bundled models (fp32 only) into ``path`` unless already there (``hf_dir``: a MiniLM copy)."""
    from tokenmill.modelserver.export import bundled_export_spec
    from tokenmill.modelserver.pipeline import export_to_repository

    for name in models:
        if not (path / name / "1" / "model.onnx").exists():
            export_to_repository(name, path, spec=bundled_export_spec(name, hf_dir), variants=())
    return path


def tiny_classifier_repository(path: Path) -> Path:
    """A classifier with the bundled one's tensors (3 x 224 x 224 -> 1000 logits) and almost no compute (average
    pool + linear), so a served run times the front end alone: body read, image decode/resize, batching, top-k."""
    import torch

    from tokenmill.modelserver import bundled
    from tokenmill.modelserver.export import export_module
    from tokenmill.modelserver.model_config import TaskConfig, config_from_onnx

    onnx_path = path / "classifier" / "1" / "model.onnx"
    if not onnx_path.exists():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1000))
        export_module(module, {"images": torch.randn(1, 3, bundled.IMAGE_SIZE, bundled.IMAGE_SIZE)}, onnx_path,
                      output_names=["logits"])
        config = config_from_onnx("classifier", onnx_path, max_batch_size=32,
                                  task=TaskConfig(kind="image_classification", labels_file="labels.txt", top_k=5))
        config.save(path / "classifier" / "config.yaml")
        (path / "classifier" / "labels.txt").write_text("\n".join(bundled.imagenet_labels()) + "\n")
    return path


def variant_repository(src: Path, dst: Path, model: str, **overrides) -> Path:
    """A one-model repository sharing ``src``'s graph (symlink) with config.yaml fields overridden."""
    (dst / model / "1").mkdir(parents=True, exist_ok=True)
    for name in ("1/model.onnx", "labels.txt"):  # links left by an earlier run may point at another source
        target, link = (src / model / name).resolve(), dst / model / name
        if link.is_symlink() and link.resolve() != target:
            link.unlink()
        if target.exists() and not link.exists():
            link.symlink_to(target)
    config = yaml.safe_load((src / model / "config.yaml").read_text())
    config.update(overrides)
    (dst / model / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dst


def web_photo(fmt: str = "jpeg") -> bytes:
    """A realistic web image for the classifier benchmarks: scikit-image's 'rocket' photograph at its own 640 x 427
    (no resampling), as JPEG quality 90 (52 KB) or PNG (313 KB): larger than the 224 x 224 input, as uploads are."""
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.rocket()).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


def binary_body(feeds: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary-tensor request body and its headers."""
    from tokenmill.modelserver.tensors import datatype_of

    inputs = [{"name": k, "shape": list(v.shape), "datatype": datatype_of(v),
               "parameters": {"binary_data_size": v.nbytes}} for k, v in feeds.items()]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    body = header + b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values())
    return body, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


async def _post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict) -> float | None:
    start = time.perf_counter()
    reply = await client.post(url, content=body, headers=headers)
    return time.perf_counter() - start if reply.status_code == 200 else None


async def closed_loop(url: str, body: bytes, headers: dict, concurrency: int, seconds: float) -> LoadResult:
    """``concurrency`` clients each sending back-to-back for ``seconds``."""
    latencies: list[float] = []
    failed = 0
    stop = time.perf_counter() + seconds
    # Keep-alive for every client: with the default (20) the rest would reconnect on every request.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker():
            nonlocal failed
            while time.perf_counter() < stop:
                took = await _post(client, url, body, headers)
                if took is None:
                    failed += 1
                else:
                    latencies.append(took)

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        duration = time.perf_counter() - start
    return summarize("closed", concurrency, latencies, failed, duration)


async def open_loop(url: str, body: bytes, headers: dict, rate: float, seconds: float, seed: int = 0) -> LoadResult:
    """Poisson arrivals at ``rate`` requests/s for ``seconds``; latency includes any queueing."""
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    failed = 0
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=512, max_keepalive_connections=512)) as client:
        async def one():
            nonlocal failed
            took = await _post(client, url, body, headers)
            if took is None:
                failed += 1
            else:
                latencies.append(took)

        tasks = []
        start = time.perf_counter()
        next_at = start
        while next_at < start + seconds:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
            next_at += rng.exponential(1.0 / rate)
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize("open", rate, latencies, failed, duration)


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """``payload`` plus date, machine, command and load averages as ``<out_dir or results/>/<name>_<time>.json``."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    full = {"date": now.isoformat(timespec="seconds"), "machine": machine(),
            "load_average_at_start": payload.pop("load_average_at_start", None),
            "load_average_at_end": list(os.getloadavg()), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            **payload}
    path = out_dir / f"{name}_{now.strftime('%Y-%m-%d_%H%M')}.json"
    path.write_text(json.dumps(full, indent=2))
    return path
