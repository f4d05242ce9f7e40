"""Dynamic batcher: queue requests per model, merge them up to max batch or max queue delay, run on instances.

One asyncio task forms batches; each batch runs in a worker thread on a free instance, so instances overlap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tokenmill.modelserver.model_config import ModelConfig

RunBatch = Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]]  # (feeds, instance) -> outputs


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    signature: tuple  # requests merge only when their non-padded shapes agree
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(self, config: ModelConfig, run_batch: RunBatch, on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[float], None] | None = None) -> None:
        self.config = config
        self.run_batch = run_batch
        self.on_batch = on_batch or (lambda rows, seconds: None)
        self.on_queue = on_queue or (lambda seconds: None)
        batching = config.dynamic_batching
        self.merge = batching is not None and config.max_batch_size > 0
        self.max_rows = max(1, config.max_batch_size)
        self.target_rows = max(batching.preferred_batch_sizes, default=self.max_rows) if batching else 1
        self.delay_s = (batching.max_queue_delay_ms / 1000.0) if batching else 0.0
        self.pad_inputs = dict(batching.pad_inputs) if batching else {}
        self.instances = config.instance_count
        self.executor = ThreadPoolExecutor(max_workers=self.instances, thread_name_prefix=f"model-{config.name}")
        self.pending: list[_Pending] = []
        self.wakeup = asyncio.Event()
        self.free_instances: asyncio.Queue[int] = asyncio.Queue()
        for i in range(self.instances):
            self.free_instances.put_nowait(i)
        self.task: asyncio.Task | None = None
        self.running: set[asyncio.Task] = set()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await asyncio.gather(*self.running, return_exceptions=True)
        for item in self.pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError(f"model {self.config.name!r} was unloaded"))
        self.executor.shutdown(wait=False)

    def _signature(self, inputs: dict[str, np.ndarray]) -> tuple:
        return tuple(
            (name, arr.dtype.str, arr.ndim if name in self.pad_inputs else arr.shape[1:])
            for name, arr in sorted(inputs.items())
        )

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one already-validated request (batch axis first when the model batches) and await its outputs."""
        rows = next(iter(inputs.values())).shape[0] if self.config.max_batch_size > 0 else 1
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(inputs, rows, self._signature(inputs), future))
        self.wakeup.set()
        return await future

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

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            # Waiting for a free instance first lets requests pile up while every instance is busy.
            instance = await self.free_instances.get()
            if self.merge:
                deadline = self.pending[0].enqueued + self.delay_s
                while self._ready_rows() < self.target_rows and (wait := deadline - time.perf_counter()) > 0:
                    self.wakeup.clear()
                    try:
                        await asyncio.wait_for(self.wakeup.wait(), timeout=wait)
                    except TimeoutError:
                        break
            batch = self._take_batch()
            task = asyncio.get_running_loop().create_task(self._execute(batch, instance))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    def _merge(self, batch: list[_Pending]) -> dict[str, np.ndarray]:
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

    async def _execute(self, batch: list[_Pending], instance: int) -> None:
        start = time.perf_counter()
        for item in batch:
            self.on_queue(start - item.enqueued)
        try:
            feeds = self._merge(batch)
            outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, feeds, instance)
        except Exception as exc:  # noqa: BLE001 - the error belongs to every request of the batch
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self.free_instances.put_nowait(instance)
            self.wakeup.set()
        self.on_batch(sum(i.rows for i in batch), time.perf_counter() - start)
        offset = 0
        for item in batch:
            if not item.future.done():
                if self.config.max_batch_size > 0:
                    item.future.set_result({k: v[offset : offset + item.rows] for k, v in outputs.items()})
                else:
                    item.future.set_result(outputs)
            offset += item.rows
