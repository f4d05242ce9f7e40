"""The engine core's per-step outputs carry only new tokens, and the API side rebuilds exactly what the in-process
engine reports (token ids, text, logprobs, finish and stop reasons), on the real tiny Llama, in one process: the
core object (EngineCore) and the API side's OutputProcessor talk through the real msgspec codec."""

from __future__ import annotations

import asyncio
import time

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.async_llm import RequestStream
from tokenmill.engine.core_client import OutputProcessor
from tokenmill.engine.core_messages import CoreOutputs, OutputCodec
from tokenmill.engine.core_proc import EngineCore
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

PROMPTS = {"a": [5, 6, 7], "b": [9, 10, 11, 12], "c": [20, 21], "d": [30, 31, 32]}
PARAMS = {
    "a": SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    "b": SamplingParams(n=2, max_tokens=9, temperature=0.8, seed=3, logprobs=2, ignore_eos=True),
    "c": SamplingParams(max_tokens=30, temperature=0.0, stop=["e"], include_stop_str_in_output=True),
    "d": SamplingParams(max_tokens=7, temperature=0.0, logprobs=1, ignore_eos=True),  # one sequence with logprobs
}


@pytest.fixture()
def make_engine(tiny_llama_dir):
    def make() -> LLMEngine:
        return LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama_dir), device="cpu", max_model_len=128))

    return make


def _in_process(engine: LLMEngine) -> dict[str, RequestOutput]:
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, PARAMS[rid])
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


class _Owner:
    def abort(self, request_id: str) -> None:
        raise AssertionError("nothing aborts here")


def test_core_deltas_rebuild_the_in_process_outputs(make_engine):
    expected = _in_process(make_engine())

    engine = make_engine()
    engine.detokenize_outputs = False  # as in the engine-core process
    core = EngineCore(engine, None, None)
    codec = OutputCodec()

    async def run() -> dict[str, RequestOutput]:
        loop = asyncio.get_running_loop()
        processor = OutputProcessor(engine.tokenizer)
        streams = {}
        reply = CoreOutputs(accepted=[], rejected=[], outputs=[])
        for rid, prompt in PROMPTS.items():
            core.add(rid, prompt, PARAMS[rid], None, time.monotonic(), reply)
            streams[rid] = RequestStream(rid, loop, _Owner())
            processor.requests[rid] = processor.new_state(streams[rid], None, prompt, PARAMS[rid])
        assert reply.accepted == list(PROMPTS)
        latest: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            reply = CoreOutputs(accepted=[], rejected=[], outputs=[])
            core.step(reply)
            message = codec.decode(codec.encode(reply))
            for delta in message.outputs:  # only what is new: one token per sequence per step here
                assert len(delta.new_token_ids) <= 1
            processor.process(message.outputs)
            for rid, stream in streams.items():
                if not stream.finished and stream._latest is not None:
                    latest[rid] = await stream.get()
        assert not processor.requests and not core._sent  # finished requests leave no state on either side
        return latest

    got = asyncio.run(run())
    for rid, want in expected.items():
        have = got[rid]
        assert have.finished
        assert [(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in have.outputs] == \
               [(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in want.outputs]
        for mine, theirs in zip(have.outputs, want.outputs, strict=True):
            if theirs.logprobs is None:
                assert mine.logprobs is None
                continue
            assert [{t: (round(lp.logprob, 5), lp.rank) for t, lp in entry.items()} for entry in mine.logprobs] == \
                   [{t: (round(lp.logprob, 5), lp.rank) for t, lp in entry.items()} for entry in theirs.logprobs]
    assert expected["c"].outputs[0].finish_reason in ("stop", "length")


def test_request_stream_keeps_the_newest_and_its_end():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        stream = RequestStream("r", loop, _Owner())

        def output(n: int, finished: bool = False) -> RequestOutput:
            return RequestOutput("r", None, [1], [], finished=finished, num_cached_tokens=n)

        waiter = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        stream.put(output(1))
        assert (await waiter).num_cached_tokens == 1
        stream.put(output(2))
        stream.put(output(3))
        assert (await stream.get()).num_cached_tokens == 3  # cumulative: the newest is all a consumer needs
        stream.put(output(4, finished=True))
        stream.put(RuntimeError("too late"))  # the end is already known
        final = await stream.get()
        assert final.finished and stream.finished

        failed = RequestStream("f", loop, _Owner())
        failed.put(output(1))
        failed.put(RuntimeError("engine died"))
        failed.put(output(2))  # an error is kept over anything after it
        for _ in range(2):
            with pytest.raises(RuntimeError, match="engine died"):
                await failed.get()
        assert failed.finished

    asyncio.run(run())
