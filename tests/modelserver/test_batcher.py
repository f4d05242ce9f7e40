"""The dynamic batcher in-process: merging up to max batch, padding ragged inputs, returning each caller's rows."""

from __future__ import annotations

import asyncio

import numpy as np

from tokenmill.modelserver.batcher import DynamicBatcher
from tokenmill.modelserver.model_config import DynamicBatching, ModelConfig, TensorSpec


def text_config(max_batch: int = 4, delay_ms: float = 50.0, batching: bool = True) -> ModelConfig:
    return ModelConfig(
        name="toy",
        inputs=[TensorSpec("input_ids", "INT64", [-1]), TensorSpec("attention_mask", "INT64", [-1])],
        outputs=[TensorSpec("total", "INT64", [1])],
        max_batch_size=max_batch,
        dynamic_batching=DynamicBatching([max_batch], delay_ms, {"input_ids": 0, "attention_mask": 0}) if batching else None,
    )


def row_sums(feeds: dict[str, np.ndarray], instance: int) -> dict[str, np.ndarray]:
    """A stand-in model: each row's sum of masked ids (padding must not change it)."""
    return {"total": (feeds["input_ids"] * feeds["attention_mask"]).sum(axis=1, keepdims=True)}


async def run_requests(config: ModelConfig, lengths: list[int]) -> tuple[list[np.ndarray], list[int]]:
    batches: list[int] = []
    batcher = DynamicBatcher(config, row_sums, on_batch=lambda rows, s: batches.append(rows))
    batcher.start()
    try:
        requests = []
        for i, n in enumerate(lengths):
            ids = np.arange(1, n + 1, dtype=np.int64)[None] * (i + 1)
            requests.append(batcher.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)}))
        results = await asyncio.gather(*requests)
    finally:
        await batcher.stop()
    return [r["total"] for r in results], batches


def test_ragged_requests_merge_with_padding_and_split_back():
    lengths = [3, 5, 2, 7, 4, 1]
    totals, batches = asyncio.run(run_requests(text_config(max_batch=4), lengths))
    expected = [(i + 1) * n * (n + 1) // 2 for i, n in enumerate(lengths)]
    assert [int(t[0, 0]) for t in totals] == expected
    assert sum(batches) == len(lengths)
    assert max(batches) == 4 and len(batches) < len(lengths)


def test_without_dynamic_batching_each_request_runs_alone():
    totals, batches = asyncio.run(run_requests(text_config(batching=False), [2, 3, 4]))
    assert batches == [1, 1, 1]
    assert [int(t[0, 0]) for t in totals] == [3, 12, 30]


def test_a_failing_batch_fails_every_request_in_it():
    def broken(feeds, instance):
        raise RuntimeError("model exploded")

    async def go():
        batcher = DynamicBatcher(text_config(), broken)
        batcher.start()
        ids = np.ones((1, 3), dtype=np.int64)
        try:
            return await asyncio.gather(*[batcher.infer({"input_ids": ids, "attention_mask": ids}) for _ in range(3)],
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(go())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
