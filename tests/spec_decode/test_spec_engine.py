"""Speculative decoding through the engine on tiny models: greedy output token-identical to plain decoding (n-gram
and draft model; prefix caching, chunked prefill, preemption, tensor parallelism), the KV caches end empty, sampled
outputs follow the target's distribution, and stop strings / EOS / max_tokens / logprobs see accepted tokens only.
"""

from __future__ import annotations

import pytest
import torch
from test_policy import LinearCost
from test_rejection_sampling import chi_square_p_value

from tokenmill import SamplingParams
from tokenmill.engine.llm import LLM
from tokenmill.spec_decode.decoder import NgramBatchProposer, SpeculativeDecoder
from tokenmill.spec_decode.policy import AdaptivePolicy

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    "Continuous batching keeps the GPU busy; paged attention stores keys",
]
BASE = dict(dtype="float32", block_size=4, num_kv_blocks=96, max_model_len=128)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def ngram(k: int = 3, **extra) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3, "prompt_lookup_min": 1, **extra}


def draft(model_dir, k: int = 3, **extra) -> dict:
    return {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": k, **extra}


def _generate(llm: LLM, params: SamplingParams, texts=TEXTS):
    return llm.generate(list(texts), params, use_tqdm=False)


def _ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _assert_no_leak(llm: LLM) -> None:
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    proposer = engine.scheduler.draft_proposer.proposer
    if hasattr(proposer, "free_blocks"):  # the draft model's own cache
        assert len(proposer.free_blocks) == proposer.num_blocks and not proposer.sequences
    assert not getattr(proposer, "_tokens", getattr(getattr(proposer, "ngram", None), "_tokens", {}))


_REFERENCE: dict[tuple, list[list[int]]] = {}


def _reference(model_dir, params: SamplingParams = GREEDY, **engine) -> list[list[int]]:
    key = (str(model_dir), repr(params), tuple(sorted(engine.items())))
    if key not in _REFERENCE:
        _REFERENCE[key] = _ids(_generate(LLM(str(model_dir), **{**BASE, **engine}), params))
    return _REFERENCE[key]


@pytest.fixture(scope="module")
def dirs(tiny_model_dirs):
    return tiny_model_dirs["llama"], tiny_model_dirs["qwen2"]


@pytest.fixture(scope="module")
def near_draft(tiny_llama_dir, tmp_path_factory):
    """The target with noise on every weight: a draft whose distribution is close to the target's, not equal.

    Noise 0.01 on weights of scale 0.2: about half the drafts are accepted. At 0.05 the draft's top 3 rarely meets
    the target's (7 of 120 accepted on CPU, 0 of 30 on an H100), too few for the test to see both outcomes.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    directory = tmp_path_factory.mktemp("near_draft")
    for path in tiny_llama_dir.iterdir():
        shutil.copy(path, directory / path.name)
    generator = torch.Generator().manual_seed(5)
    for path in directory.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({name: t + 0.01 * torch.randn(t.shape, generator=generator) for name, t in tensors.items()},
                  path, metadata={"format": "pt"})
    return directory


CACHING = {"enable_prefix_caching": True}
NO_CACHING = {"enable_prefix_caching": False}
CHUNKED = {"max_num_batched_tokens": 16}  # chunked prefill: prompts in pieces, mixed with verification rows
PREEMPTION = {"num_kv_blocks": 24}  # three sequences of up to 12 blocks in 24 blocks


@pytest.mark.parametrize("method, engine_args", [
    ("ngram", CACHING), ("ngram", NO_CACHING), ("ngram", CHUNKED), ("ngram", PREEMPTION),
    ("draft-other", CHUNKED), ("draft-other", PREEMPTION),
], ids=["ngram-caching", "ngram-no-caching", "ngram-chunked", "ngram-preemption", "draft-chunked",
        "draft-preemption"])
def test_greedy_output_is_token_identical(dirs, method, engine_args):
    target, other = dirs
    # Not adaptive: drafts every step (the policy would rightly never let the target draft for itself).
    spec = {"ngram": ngram(adaptive=False), "draft-self": draft(target, adaptive=False),
            "draft-other": draft(other, adaptive=False)}[method]
    llm = LLM(str(target), **{**BASE, **engine_args}, speculative_config=spec)
    assert _ids(_generate(llm, GREEDY)) == _reference(target, **engine_args)
    stats = llm.engine.get_stats().spec_decode
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
    if engine_args.get("num_kv_blocks") == 24:
        assert llm.engine.get_stats().num_preemptions > 0
    if method == "ngram":  # the repeated fox sentence gets n-gram drafts accepted (3-4 tokens on this tiny model)
        assert stats.num_accepted_tokens > 0
    _assert_no_leak(llm)


def test_a_target_drafting_for_itself_has_every_draft_accepted(dirs):
    target, _ = dirs
    llm = LLM(str(target), **BASE, speculative_config=draft(target, adaptive=False))
    assert _ids(_generate(llm, GREEDY)) == _reference(target)
    stats = llm.engine.get_stats().spec_decode
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    _assert_no_leak(llm)


def test_the_adaptive_policy_learns_step_costs_from_the_engine_and_output_stays_identical(dirs):
    target, _ = dirs
    llm = LLM(str(target), **BASE, speculative_config=ngram())  # adaptive: the engine builds a measured cost
    assert _ids(_generate(llm, GREEDY)) == _reference(target)
    cost = llm.engine.scheduler.draft_proposer.policy.step_cost
    assert cost.num_steps == llm.engine.num_steps and cost.points()  # every step landed was measured
    _assert_no_leak(llm)


class RecordingPolicy(AdaptivePolicy):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plans: list[tuple[int, int, int]] = []  # (rows offered, rows chosen, k)

    def plan(self, seq_ids, num_other_tokens=0, uniform=False):
        plan = super().plan(seq_ids, num_other_tokens, uniform)
        self.plans.append((len(seq_ids), len(plan.seq_ids), plan.k))
        return plan


def test_rows_whose_drafts_fail_stop_speculating_while_the_others_go_on(dirs):
    """A cost model where verification costs (injected: deterministic): the repeated fox sentence keeps its drafts,
    rows whose drafts fail drop out of the plan; greedy output equals plain decoding's."""
    target, _ = dirs
    policy = RecordingPolicy(3, LinearCost(fixed=0.8, per_token=0.05))
    decoder = SpeculativeDecoder(NgramBatchProposer(1, 3), policy)
    llm = LLM(str(target), **BASE, device="cpu", draft_proposer=decoder)  # CPU: the same acceptances everywhere
    assert _ids(_generate(llm, GREEDY)) == _reference(target, device="cpu")
    assert any(chosen == offered for offered, chosen, k in policy.plans if k and offered == 3)
    assert any(0 < chosen < offered for offered, chosen, k in policy.plans if k)
    assert decoder.stats.num_accepted_tokens > 0
    _assert_no_leak(llm)

def test_async_scheduling_overlaps_while_speculation_is_off_and_lands_verification_rows(dirs):
    """Async scheduling (forced on CPU): while more sequences run than ``disable_by_batch_size`` steps overlap; once
    fewer run, verification rows start and each lands before the next step is scheduled."""
    target, _ = dirs
    texts = TEXTS + [TEXTS[0][:40]]
    reference = _ids(_generate(LLM(str(target), **BASE), SamplingParams(temperature=0.0, max_tokens=24,
                                                                          ignore_eos=True), texts))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (24, 24, 24, 6)]
    llm = LLM(str(target), **BASE, async_scheduling=True,
              speculative_config=ngram(adaptive=False, disable_by_batch_size=3))
    got = _ids(llm.generate(texts, params, use_tqdm=False))
    assert got[:3] == reference[:3] and got[3] == reference[3][:6]
    assert llm.engine.get_stats().spec_decode.num_drafts > 0
    _assert_no_leak(llm)


@pytest.mark.parametrize("method", ["ngram", "draft-self"])
def test_greedy_with_two_tensor_parallel_ranks(dirs, method):
    """The target on two gloo ranks; a draft model runs beside rank 0 only (its proposals travel in the record)."""
    target, _ = dirs
    spec = ngram(adaptive=False) if method == "ngram" else draft(target, adaptive=False)
    llm = LLM(str(target), **BASE, device="cpu", tensor_parallel_size=2, speculative_config=spec)  # gloo ranks
    try:
        assert _ids(_generate(llm, GREEDY)) == _reference(target)
        assert llm.engine.get_stats().spec_decode.num_accepted_tokens > 0
        _assert_no_leak(llm)
    finally:
        llm.engine.shutdown()


def test_stops_limits_and_logprobs_see_only_accepted_tokens(dirs):
    target, _ = dirs
    reference = LLM(str(target), **BASE)
    plain = _generate(reference, GREEDY)
    text = plain[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a stop string somewhere inside a verified run
    eos = plain[1].outputs[0].token_ids[7]  # this token as a stop id: EOS in the middle of accepted drafts
    cases = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[eos]),
        SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3, min_tokens=4,
                       frequency_penalty=0.2),
    ]
    wanted = [_generate(reference, params) for params in cases]
    for spec in (ngram(adaptive=False), draft(target, adaptive=False)):
        llm = LLM(str(target), **BASE, speculative_config=spec)
        for params, want in zip(cases, wanted, strict=True):
            got = _generate(llm, params)
            for w, g in zip(want, got, strict=True):
                assert g.outputs[0].token_ids == w.outputs[0].token_ids
                assert (g.outputs[0].text, g.outputs[0].finish_reason, g.outputs[0].stop_reason) == (
                    w.outputs[0].text, w.outputs[0].finish_reason, w.outputs[0].stop_reason)
                if params.logprobs:
                    assert len(g.outputs[0].logprobs) == len(g.outputs[0].token_ids) == params.max_tokens
                    for wl, gl in zip(w.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
                        assert wl.keys() == gl.keys()
                        for token, lp in wl.items():
                            assert gl[token].logprob == pytest.approx(lp.logprob, abs=1e-4)
        assert llm.engine.get_stats().spec_decode.num_accepted_tokens > 0
        _assert_no_leak(llm)


def test_seeded_sampling_is_reproducible(dirs):
    target, other = dirs
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, max_tokens=10, seed=7, ignore_eos=True)
    for spec in (ngram(adaptive=False), draft(other, adaptive=False)):
        llm = LLM(str(target), **BASE, speculative_config=spec)
        first, second = _ids(_generate(llm, params)), _ids(_generate(llm, params))
        assert first == second
        _assert_no_leak(llm)


def _two_sample_p_value(a: list[tuple], b: list[tuple]) -> float:
    """Chi-square test of homogeneity of two samples of outcomes (outcomes seen < 5 times pooled into one cell)."""
    keys = sorted(set(a) | set(b))
    count_a = torch.tensor([a.count(key) for key in keys], dtype=torch.float64)
    count_b = torch.tensor([b.count(key) for key in keys], dtype=torch.float64)
    rare = (count_a + count_b) < 5
    if rare.any():
        count_a = torch.cat([count_a[~rare], count_a[rare].sum()[None]])
        count_b = torch.cat([count_b[~rare], count_b[rare].sum()[None]])
    # Under homogeneity, given the pooled totals, sample a's share of each cell is known: a goodness-of-fit test.
    total = count_a + count_b
    expected_share = total / total.sum()
    stat_a = chi_square_p_value(count_a, expected_share)
    return stat_a


class GreedyOracle:
    """Proposes the target's greedy continuation of one prompt (right whenever the sample took the likeliest
    tokens): a point-mass proposal that is often accepted, as n-gram drafts are on quoting prompts."""

    def __init__(self, prompt: list[int], continuation: list[int]) -> None:
        self.sequence = prompt + continuation

    def propose(self, seq_id: str, token_ids: list[int], max_num_tokens: int) -> list[int]:
        if token_ids != self.sequence[: len(token_ids)]:
            return []
        return self.sequence[len(token_ids) : len(token_ids) + min(3, max_num_tokens)]


@pytest.fixture(scope="module")
def near_subset_draft(near_draft, tmp_path_factory):
    """The near draft proposing from half the vocabulary (ids ranked at random): its q is zero on the rest, where
    the target's likely tokens often are, so both accepted drafts and residual draws occur."""
    import json
    import shutil

    from tokenmill.spec_decode.draft_vocab import write_draft_vocab

    directory = tmp_path_factory.mktemp("near_subset_draft")
    for path in near_draft.iterdir():
        shutil.copy(path, directory / path.name)
    vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    write_draft_vocab(directory, torch.randperm(vocab, generator=torch.Generator().manual_seed(3)), vocab // 2)
    return directory


@pytest.mark.parametrize("method", ["point-mass", "draft-near", "draft-near-subset"])
def test_sampled_outputs_follow_the_target_distribution(dirs, near_draft, near_subset_draft, method):
    """160 sampled continuations (top-k 3, 4 tokens) with and without speculation: the same distribution."""
    target, _ = dirs
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=4, ignore_eos=True)
    prompt = LLM(str(target), **BASE).get_tokenizer().encode(TEXTS[2])
    drafts = {"draft-near": near_draft, "draft-near-subset": near_subset_draft}
    extra = {"draft_proposer": GreedyOracle(prompt, _reference(target)[2])} if method == "point-mass" else {
        "speculative_config": draft(drafts[method], adaptive=False)}

    def sample(**extra) -> tuple[list[tuple], LLM]:
        torch.manual_seed(0)
        llm = LLM(str(target), **{**BASE, "num_kv_blocks": 1200, "max_num_seqs": 160}, **extra)
        return [tuple(ids) for ids in _ids(_generate(llm, params, [prompt] * 160))], llm

    plain, _ = sample()
    speculative, llm = sample(**extra)
    if method != "point-mass":  # both acceptances and residual draws happened
        stats = llm.engine.get_stats().spec_decode
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
        proposer = llm.engine.scheduler.draft_proposer.proposer
        assert (proposer.vocab_ids is not None) == (method == "draft-near-subset")
    assert _two_sample_p_value(plain, speculative) > 1e-3


def test_a_draft_with_another_tokenizer_is_refused(tmp_path, dirs):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny_models import build_tokenizer, make_tiny_model_dir

    target, _ = dirs
    foreign = make_tiny_model_dir(tmp_path / "foreign", "llama")
    build_tokenizer(foreign, vocab_size=300)
    with pytest.raises(ValueError, match="tokenizer differs from the target's"):
        LLM(str(target), **BASE, speculative_config=draft(foreign))
