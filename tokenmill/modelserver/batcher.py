"""Dynamic batcher: queue requests per model, merge them up to max batch or max queue delay, run on instances.

Batches form on the batcher's own thread, never on the HTTP event loop: a loop busy parsing requests under many
clients used to delay batch formation, shrinking batches exactly when load was highest. Each batch is merged
(text requests tokenized together in one ``encode_batch`` call), run and split on a worker thread per instance;
results go back to each caller's event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tokenmill.modelserver.model_config import ModelConfig

RunBatch = Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]]  # (feeds, instance) -> outputs
Tokenize = Callable[[list[str]], dict[str, np.ndarray]]  # texts -> padded feeds
TEXTS = ("texts",)  # the merge signature of raw-text requests


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray] | list[str]  # tensors, or raw texts tokenized when the batch runs
    rows: int
    signature: tuple  # requests merge only when their non-padded shapes agree
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)

    def resolve(self, result: object = None, error: BaseException | None = None) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():  # the caller went away (client disconnect cancels the handler)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DynamicBatcher:
    def __init__(self, config: ModelConfig, run_batch: RunBatch, on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[float], None] | None = None, tokenize: Tokenize | None = None) -> None:
        self.config = config
        self.run_batch = run_batch
        self.tokenize = tokenize
        self.on_batch = on_batch or (lambda rows, seconds: None)
        self.on_queue = on_queue or (lambda seconds: None)
        batching = config.dynamic_batching
        self.merge = batching is not None and config.max_batch_size > 0
        self.max_rows = max(1, config.max_batch_size)
        self.target_rows = max(batching.preferred_batch_sizes, default=self.max_rows) if batching else 1
        self.delay_s = (batching.max_queue_delay_ms / 1000.0) if batching else 0.0
        self.pad_inputs = dict(batching.pad_inputs) if batching else {}
        self.executor = ThreadPoolExecutor(max_workers=config.instance_count, thread_name_prefix=f"model-{config.name}")
        self.cond = threading.Condition()
        self.pending: list[_Pending] = []
        self.free_instances = list(range(config.instance_count))
        self.stopping = False
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name=f"batcher-{self.config.name}", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join)
        await asyncio.to_thread(self.executor.shutdown, wait=True)  # batches already running finish
        with self.cond:
            left, self.pending = self.pending, []
        for item in left:
            item.resolve(error=RuntimeError(f"model {self.config.name!r} was unloaded"))

    def _signature(self, inputs: dict[str, np.ndarray]) -> tuple:
        return tuple(
            (name, arr.dtype.str, arr.ndim if name in self.pad_inputs else arr.shape[1:])
            for name, arr in sorted(inputs.items())
        )

    async def infer(self, inputs: dict[str, np.ndarray] | list[str]) -> dict[str, np.ndarray]:
        """Queue one validated request (tensors with the batch axis first when the model batches, or texts when
        the batcher has a tokenizer) and await its outputs."""
        if isinstance(inputs, list):
            if self.tokenize is None:
                raise RuntimeError(f"model {self.config.name!r} has no tokenizer for text requests")
            rows, signature = len(inputs), TEXTS
        else:
            rows = next(iter(inputs.values())).shape[0] if self.config.max_batch_size > 0 else 1
            signature = self._signature(inputs)
        loop = asyncio.get_running_loop()
        item = _Pending(inputs, rows, signature, loop.create_future(), loop)
        with self.cond:
            if self.stopping:
                raise RuntimeError(f"model {self.config.name!r} is being unloaded")
            self.pending.append(item)
            self.cond.notify()
        return await item.future

    def _take_batch(self) -> list[_Pending]:
        """The oldest request plus every compatible one behind it that fits in max_batch_size."""
        first = self.pending[0]
        batch, rows, rest = [first], first.rows, []
        for item in self.pending[1:]:
            if self.merge and item.signature == first.signature and rows + item.rows <= self.max_rows:
                batch.append(item)
                rows += item.rows
            else:
                rest.append(item)
        self.pending = rest
        return batch

    def _ready_rows(self) -> int:
        first = self.pending[0]
        return sum(i.rows for i in self.pending if i.signature == first.signature)

    def _loop(self) -> None:
        while True:
            with self.cond:
                # Waiting for a free instance first lets requests pile up while every instance is busy.
                while not self.stopping and not (self.pending and self.free_instances):
                    self.cond.wait()
                if self.stopping:
                    return
                if self.merge:
                    deadline = self.pending[0].enqueued + self.delay_s
                    while (not self.stopping and self._ready_rows() < self.target_rows
                           and (wait := deadline - time.perf_counter()) > 0):
                        self.cond.wait(wait)
                    if self.stopping:
                        return
                batch = self._take_batch()
                instance = self.free_instances.pop()
            self.executor.submit(self._execute, batch, instance)

    def _merge(self, batch: list[_Pending]) -> dict[str, np.ndarray]:
        if batch[0].signature == TEXTS:
            return self.tokenize([text for item in batch for text in item.inputs])
        if len(batch) == 1:
            return batch[0].inputs
        merged = {}
        for name in batch[0].inputs:
            arrays = [item.inputs[name] for item in batch]
            if name in self.pad_inputs:
                target = np.max([a.shape for a in arrays], axis=0)
                arrays = [
                    np.pad(a, [(0, 0)] + [(0, int(t - s)) for s, t in zip(a.shape[1:], target[1:], strict=True)],
                           constant_values=self.pad_inputs[name])
                    for a in arrays
                ]
            merged[name] = np.concatenate(arrays, axis=0)
        return merged

    def _execute(self, batch: list[_Pending], instance: int) -> None:
        start = time.perf_counter()
        for item in batch:
            self.on_queue(start - item.enqueued)
        try:
            outputs = self.run_batch(self._merge(batch), instance)
        except Exception as exc:  # noqa: BLE001 - the error belongs to every request of the batch
            for item in batch:
                item.resolve(error=exc)
            return
        finally:
            with self.cond:
                self.free_instances.append(instance)
                self.cond.notify()
        self.on_batch(sum(i.rows for i in batch), time.perf_counter() - start)
        offset = 0
        for item in batch:
            if self.config.max_batch_size > 0:
                item.resolve({k: v[offset : offset + item.rows] for k, v in outputs.items()})
            else:
                item.resolve(outputs)
            offset += item.rows
