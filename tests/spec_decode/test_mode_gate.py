"""The speculation gate of an overlapping engine: it keeps the mode that measures more decode tokens per second,
stops speculating as soon as speculation's own rate falls below plain decoding's, and re-tries a losing mode at
doubling intervals (so it costs a few percent at most). Plus the engine on CPU with async scheduling forced on:
greedy output unchanged with the gate deciding, and both modes measured."""

from __future__ import annotations

import pytest
from test_spec_engine import GREEDY, TEXTS, _assert_no_leak, _ids, ngram

from tokenmill.engine.llm import LLM
from tokenmill.spec_decode.mode_gate import ModeGate


def drive(gate: ModeGate, rates: dict[bool, float], steps: int, batch: int = 64) -> list[bool]:
    """Run ``steps`` steps, each in the mode the gate picks, gaining tokens at that mode's rate (tokens/s)."""
    modes = []
    for _ in range(steps):
        mode = gate.choose(batch)
        gate.record(batch, mode, round(rates[mode] * 0.01), 0.01)
        modes.append(mode)
    return modes


@pytest.mark.parametrize("faster", [True, False])
def test_keeps_the_faster_mode_and_probes_the_other_rarely(faster):
    rates = {faster: 3000.0, not faster: 1000.0}
    modes = drive(ModeGate(), rates, 2000)
    slower_steps = sum(mode != faster for mode in modes)
    assert modes[-1] == faster
    # Both modes measured first (4 steps each), then probes of 4 steps after 32, 64, ... 1024 steps of the winner.
    assert slower_steps <= 4 + 4 * 6, slower_steps


def test_stops_speculating_when_its_rate_falls_below_plain():
    gate = ModeGate()
    modes = drive(gate, {True: 3000.0, False: 1000.0}, 100)
    assert modes[-1] is True
    modes = drive(gate, {True: 600.0, False: 1000.0}, 40)  # the drafts stop being accepted
    switched = modes.index(False)
    assert switched <= 16  # within the rate window
    assert sum(modes[switched:]) <= 4  # at most one probe of speculation afterwards


def test_rates_are_per_batch_bucket_and_bad_arguments_fail():
    gate = ModeGate()
    drive(gate, {True: 3000.0, False: 1000.0}, 50, batch=1)
    assert gate.rate(1, True) == pytest.approx(3000.0) and gate.rate(256, True) is None
    with pytest.raises(ValueError):
        ModeGate(window=4, probe_steps=8)


def test_async_cpu_engine_with_the_gate_keeps_greedy_output(tiny_llama_dir):
    """async_scheduling forced on CPU: each step asks the gate; greedy tokens equal plain decoding's."""
    reference = _ids(LLM(str(tiny_llama_dir), device="cpu", dtype="float32").generate(TEXTS, GREEDY, use_tqdm=False))
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", async_scheduling=True, speculative_config=ngram(k=3))
    for _ in range(2):  # three rows: a batch where speculation may pay on this CPU (the policy's prior)
        assert _ids(llm.generate(TEXTS, GREEDY, use_tqdm=False)) == reference
    gate = llm.engine.scheduler.draft_proposer.gate
    measured = {mode for bucket in gate.buckets.values() for mode, samples in bucket.samples.items() if samples}
    assert measured == {True, False}
    _assert_no_leak(llm)


def test_steps_with_prompt_work_keep_overlap_and_propose_nothing(tiny_llama_dir):
    """While prompts wait or are mid-prefill the adaptive decoder does not ask the gate and proposes no drafts, so
    an overlapping engine keeps overlapping through large prompt steps; greedy output is unchanged."""
    from tokenmill.sampling_params import SamplingParams

    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", async_scheduling=True, speculative_config=ngram(k=3))
    engine = llm.engine
    decoder = engine.scheduler.draft_proposer
    assert decoder.active(3, prompt_work=lambda: False)  # below the CPU ridge: speculation may pay (a probe starts)
    probe_left = [b.probe_left for b in decoder.gate.buckets.values()]
    assert not decoder.active(3, prompt_work=lambda: True) and not decoder.speculating
    assert [b.probe_left for b in decoder.gate.buckets.values()] == probe_left  # the gate was not asked
    assert not engine.scheduler.has_prompt_work()
    engine.add_request("r", [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert engine.scheduler.has_prompt_work()  # waiting
    engine.step()
    assert not engine.scheduler.has_prompt_work()  # its whole prompt was scheduled
    while engine.has_unfinished_requests() or engine.in_flight is not None:
        engine.step()
    _assert_no_leak(llm)
