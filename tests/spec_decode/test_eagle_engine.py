"""The EAGLE proposer (spec_decode/eagle_proposer.py) in the engine, on a tiny random Llama target: greedy output
token-identical to plain decoding (batch 3; chunked prefill, preemption, prefix caching), state freed at the end,
the proposer's drafts equal to the reference loop's (spec_decode/eagle_reference.py) for the same head and features,
in the engine and fed directly, and bad heads refused at start-up.

Two heads: a random one from ``EagleHead``'s constructor (drafts almost never accepted), and the "shifted copy": on a
one-layer target, the head's layer is the target's layer and fc passes the next token's embedding only, so at
position t it computes what the target computes at t + 1 (RoPE is relative; only the target's position 0 is missing
from its cache): most drafts are accepted, so catch-ups over several accepted positions are exercised.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import make_tiny_model_dir

from tokenmill import SamplingParams
from tokenmill.distill.eagle_data import teacher_features
from tokenmill.distill.eagle_head import EagleConfig, EagleHead
from tokenmill.engine.llm import LLM
from tokenmill.spec_decode.decoder import DraftRequest
from tokenmill.spec_decode.draft_vocab import load_draft_vocab, write_draft_vocab
from tokenmill.spec_decode.eagle_proposer import EagleProposer
from tokenmill.spec_decode.eagle_reference import EagleDrafter, speculative_greedy

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    "Continuous batching keeps the GPU busy; paged attention stores keys",
]
BASE = dict(dtype="float32", block_size=4, num_kv_blocks=96, max_model_len=128, device="cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _hf(target_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A one-layer tiny Llama (the shifted-copy head needs one layer) and its transformers twin."""
    directory = make_tiny_model_dir(tmp_path_factory.mktemp("eagle_target"), "llama", num_hidden_layers=1)
    return directory, _hf(directory)


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory):
    """name -> saved head directory: "random" (the constructor's init, a reduced draft vocabulary of 200 ids) and
    "shifted" (see the module docstring)."""
    _, hf = target
    root = tmp_path_factory.mktemp("eagle_heads")
    torch.manual_seed(3)
    random_head = EagleHead(EagleConfig.from_target(hf.config), hf.get_input_embeddings().weight,
                            hf.get_output_embeddings().weight)
    random_head.save(root / "random", draft_vocab_size=200)
    counts = torch.randint(0, 50, (hf.config.vocab_size,), generator=torch.Generator().manual_seed(4))
    write_draft_vocab(root / "random", counts, 200)
    shifted = EagleHead.from_target(hf)
    h = hf.config.hidden_size
    with torch.no_grad():
        shifted.fc.weight.copy_(torch.cat([torch.eye(h), torch.zeros(h, h)], 1))
    shifted.save(root / "shifted")
    return {"random": root / "random", "shifted": root / "shifted"}


def eagle(head_dir, k: int = 3, **extra) -> dict:
    return {"method": "eagle", "model": str(head_dir), "num_speculative_tokens": k, "adaptive": False, **extra}


def _ids(llm: LLM, params: SamplingParams = GREEDY, texts=TEXTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(list(texts), params, use_tqdm=False)]


_PLAIN: dict[tuple, list[list[int]]] = {}


def _plain(target_dir, texts=TEXTS, **engine) -> list[list[int]]:
    key = (str(target_dir), tuple(texts), tuple(sorted(engine.items())))
    if key not in _PLAIN:
        _PLAIN[key] = _ids(LLM(str(target_dir), **{**BASE, **engine}), texts=texts)
    return _PLAIN[key]


def _assert_freed(llm: LLM) -> None:
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.draft_proposer.proposer.sequences


SHARED = "You are a helpful assistant. Answer briefly and exactly. "


@pytest.mark.parametrize("head, engine_args, texts", [
    ("random", {}, TEXTS),
    ("shifted", {}, TEXTS),
    ("shifted", {"max_num_batched_tokens": 16}, TEXTS),  # chunked prefill, prompt chunks beside verification rows
    ("shifted", {"num_kv_blocks": 24}, TEXTS),  # preemption: recomputed prompts hand their features again
    ("shifted", {"enable_prefix_caching": True}, [SHARED + t for t in TEXTS]),  # later prompts skip the prefix
], ids=["random", "shifted", "shifted-chunked", "shifted-preemption", "shifted-prefix-cache"])
def test_greedy_output_is_token_identical_to_plain_decoding(target, heads, head, engine_args, texts):
    target_dir, _ = target
    llm = LLM(str(target_dir), **{**BASE, **engine_args}, speculative_config=eagle(heads[head]))
    if engine_args.get("enable_prefix_caching"):  # one prompt first: the batch then finds the shared prefix cached
        assert _ids(llm, texts=texts[:1]) == _plain(target_dir, texts, **engine_args)[:1]
    assert _ids(llm, texts=texts) == _plain(target_dir, texts, **engine_args)
    stats = llm.engine.get_stats().spec_decode
    assert stats.num_drafts > 0
    if head == "shifted":  # most drafts accepted: catch-ups read several positions
        assert stats.num_accepted_tokens > stats.num_draft_tokens / 2
        assert stats.accepted_per_pos[-1] > 0
    if engine_args.get("num_kv_blocks") == 24:
        assert llm.engine.get_stats().num_preemptions > 0
    if engine_args.get("enable_prefix_caching"):
        assert llm.engine.get_stats().prefix_cache_hits > 0
    _assert_freed(llm)


def test_engine_drafts_equal_the_reference_loop_on_the_same_head(target, heads):
    """Batch 1: every round's drafts in the engine (hidden states from tokenmill's runner) equal the reference loop's
    (transformers' features), and so does the output."""
    target_dir, hf = target
    llm = LLM(str(target_dir), **BASE, speculative_config=eagle(heads["shifted"], k=4))
    proposer = llm.engine.scheduler.draft_proposer.proposer
    engine_rounds: list[list[int]] = []
    propose_many = proposer.propose_many

    def recording(requests, k):
        out = propose_many(requests, k)
        engine_rounds.extend(out.values())
        return out

    proposer.propose_many = recording
    prompt = llm.engine.tokenizer.encode(TEXTS[1])
    got = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids

    drafter = EagleDrafter(proposer.head)
    reference_rounds: list[list[int]] = []
    propose = drafter.propose
    drafter.propose = lambda k: reference_rounds.append(propose(k)) or reference_rounds[-1]
    result = speculative_greedy(hf, drafter, prompt, 4, GREEDY.max_tokens, None)
    assert got == result.tokens
    # At the end the reference may draft once more (it drafts for the last token; the engine has no room left).
    assert len(reference_rounds) - len(engine_rounds) in (0, 1) and len(engine_rounds) > 3
    for mine, theirs in zip(engine_rounds, reference_rounds, strict=False):  # the last rounds cut at max_tokens
        n = min(len(mine), len(theirs))
        assert mine[:n] == theirs[:n]
    assert sum(result.round_lengths) > len(result.round_lengths)  # drafts were accepted


def test_batched_proposer_drafts_equal_the_reference_drafter(target, heads):
    """Fed directly: two sequences of different lengths, each round a verification accepts 0..k drafts; the runner's
    rows past the accepted positions carry garbage that the next step overwrites. Every round's drafts equal a batch-1
    reference drafter's on the same features, the reduced draft vocabulary mapped back to target ids."""
    _, hf = target
    vocab_ids = load_draft_vocab(heads["random"], hf.config.vocab_size)
    head = EagleHead.load(heads["random"], hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)
    proposer = EagleProposer(head, vocab_ids)
    rng = random.Random(0)
    k = 3
    ids = {name: torch.randint(3, hf.config.vocab_size, (length,), generator=torch.Generator().manual_seed(i))
           for i, (name, length) in enumerate([("a", 60), ("b", 50)])}
    features = {name: teacher_features(hf, seq) for name, seq in ids.items()}
    drafters = {name: EagleDrafter(head, vocab_ids) for name in ids}
    known = {"a": 9, "b": 4}  # ids known (prompt + accepted); the target has computed positions 0..known - 2
    for name, n in known.items():
        proposer.add_features(name, 0, features[name][: n - 1])
        drafters[name].extend(ids[name][1:n], features[name][: n - 1])
    allowed = set(vocab_ids.tolist())
    for _ in range(8):
        drafts = proposer.propose_many([DraftRequest(name, ids[name][:n].tolist(), k) for name, n in known.items()], k)
        for name, n in known.items():
            assert drafts[name] == drafters[name].propose(k), name
            assert set(drafts[name]) <= allowed
            # The verification computes positions n - 1 .. n - 1 + k and accepts a drafts: rows past n - 1 + a are
            # of rejected inputs.
            a = rng.randint(0, k)
            garbage = torch.randn(k - a, features[name].shape[1])
            proposer.add_features(name, n - 1, torch.cat([features[name][n - 1 : n + a], garbage]))
            drafters[name].extend(ids[name][n : n + a + 1], features[name][n - 1 : n + a])
            known[name] = n + a + 1
    proposer.release("a")
    proposer.release("b")
    assert not proposer.sequences


def test_sampled_requests_are_verified_by_the_targets_draws(target, heads):
    """Sampled rows get the head's argmax drafts without draft probabilities: the target's own draws verify them
    (exact); seeded requests repeat."""
    target_dir, _ = target
    llm = LLM(str(target_dir), **BASE, speculative_config=eagle(heads["shifted"]))
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, seed=7)
    first, second = _ids(llm, params), _ids(llm, params)
    assert first == second and all(len(ids) == 24 for ids in first)
    assert llm.engine.get_stats().spec_decode.num_accepted_tokens > 0
    _assert_freed(llm)


def _broken_head(heads, tmp_path, **changes):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((heads["shifted"] / "model.safetensors").read_bytes())
    config = json.loads((heads["shifted"] / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **changes}))
    return broken


@pytest.mark.parametrize("change, message", [
    (None, "is not one"),
    ({"hidden_size": 32}, "not trained for this target: hidden_size 32"),
    ({"vocab_size": 1000}, "vocab_size 1000"),
    ({"architectures": ["LlamaForCausalLM"]}, "is not an EAGLE head"),
], ids=["missing", "hidden-size", "vocab", "not-eagle"])
def test_bad_heads_fail_at_start_up_with_a_clear_error(target, heads, tmp_path, change, message):
    target_dir, _ = target
    head_dir = tmp_path / "nowhere" if change is None else _broken_head(heads, tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        LLM(str(target_dir), **BASE, speculative_config=eagle(head_dir))


def test_a_head_whose_draft_vocabulary_ranking_is_missing_is_refused(target, heads, tmp_path):
    target_dir, _ = target
    broken = _broken_head(heads, tmp_path, draft_vocab_size=100)
    with pytest.raises(ValueError, match="draft_vocab.json is missing"):
        LLM(str(target_dir), **BASE, speculative_config=eagle(broken))



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_on_cuda_graphs_hands_hidden_states_and_is_token_identical(target, heads):
    """CUDA: every decode graph ends at the hidden states (the feature sink reads them, the LM head runs after the
    replay), async scheduling and rows padded to one draft count; output equals plain decoding's."""
    target_dir, _ = target
    cuda = {**BASE, "device": "cuda", "block_size": 16, "num_kv_blocks": 64}
    reference = _ids(LLM(str(target_dir), **cuda))
    llm = LLM(str(target_dir), **cuda, speculative_config=eagle(heads["shifted"], k=4))
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.eager_logits_from == 1 and llm.engine.runner.feature_sink is not None
    assert _ids(llm) == reference
    stats = llm.engine.get_stats().spec_decode
    assert stats.num_accepted_tokens > stats.num_draft_tokens / 2
    _assert_freed(llm)
