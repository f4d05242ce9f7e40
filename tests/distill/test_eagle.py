"""The EAGLE draft head on a tiny random Llama teacher: its layer equals the teacher's, training lowers the loss, the
saved head reloads, and the reference loop's output equals plain greedy (its replay giving the same rounds)."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import tiny_eagle_features, tiny_eagle_teacher

from tokenmill.distill.eagle_data import (
    FeatureSet,
    generate_with_features,
    teacher_features,
)
from tokenmill.distill.eagle_head import EagleHead, KVCache
from tokenmill.distill.eagle_train import (
    EagleTrainConfig,
    draft_acceptance,
    draft_passes,
    lr_at,
    pad_batch,
    step_losses,
    train,
)
from tokenmill.spec_decode.eagle_reference import EagleDrafter, plain_greedy, replay, speculative_greedy


@pytest.fixture(scope="module")
def teacher():
    return tiny_eagle_teacher()


@pytest.fixture(scope="module")
def features(teacher) -> FeatureSet:
    data, check = tiny_eagle_features(teacher, 12)
    assert check["teacher_argmax_equals_answer"] == 1.0  # the answers are the teacher's greedy output
    return data


def test_layer_matches_teacher_last_layer_with_and_without_cache(teacher) -> None:
    head = EagleHead.from_target(teacher)
    x = torch.randn(1, 7, 64)
    positions = torch.arange(7)[None]
    expected = teacher.model.layers[-1](x, position_embeddings=teacher.model.rotary_emb(x, positions),
                                        attention_mask=None, position_ids=positions)
    expected = expected[0] if isinstance(expected, tuple) else expected
    with torch.no_grad():
        whole = head.layers[0](x, 0, None)
        cache = KVCache()
        parts = torch.cat([head.layers[0](x[:, :4], 0, cache), head.layers[0](x[:, 4:], 4, cache)], 1)
    torch.testing.assert_close(whole, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unroll", [1, 3])
def test_training_lowers_the_loss_and_the_saved_head_reloads(teacher, features, tmp_path, unroll) -> None:
    head = EagleHead.from_target(teacher)
    rows = head.lm_head

    def loss() -> float:
        ids, feats, answer = pad_batch(features, list(range(len(features))))
        with torch.no_grad():
            parts = step_losses(head, rows, ids, feats, answer, 0.0, 1, None)
        return (parts["feature"] + parts["token"]).item()

    before = loss()
    history = train(head, features, EagleTrainConfig(steps=30, batch_size=4, lr=3e-3, warmup_steps=2,
                                                     token_weight=1.0, unroll=unroll), None, log=lambda _: None)
    assert len(history["steps"]) == 30
    assert loss() < 0.8 * before
    head.save(tmp_path / "head", draft_vocab_size=None)
    again = EagleHead.load(tmp_path / "head", head.embed, head.lm_head)
    ids, feats, _ = pad_batch(features, [0, 1])
    with torch.no_grad():
        torch.testing.assert_close(again(ids[:, 1:], feats[:, :-1]), head(ids[:, 1:], feats[:, :-1]))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("subset", [False, True])
def test_reference_loop_equals_plain_greedy_and_its_replay(teacher, features, k, subset) -> None:
    head = EagleHead.from_target(teacher).eval()
    torch.manual_seed(2)
    with torch.no_grad():  # a head that drafts imperfectly, so rounds both accept and reject
        head.fc.weight.add_(0.05 * torch.randn_like(head.fc.weight))
    rows_ids = torch.randperm(96)[:48] if subset else None
    seen: set[int] = set()
    for i in range(4):
        ids, feats, prompt_len = features.sequence(i)
        prompt = ids[:prompt_len].tolist()
        expected = plain_greedy(teacher, prompt, 16, None)
        result = speculative_greedy(teacher, EagleDrafter(head, rows_ids), prompt, k, 16, None)
        assert result.tokens == expected
        assert sum(result.round_lengths) == len(expected) - 1
        assert max(result.round_lengths) <= k + 1
        assert replay(head, ids, feats, prompt_len, k, rows_ids) == result.round_lengths
        seen.update(result.round_lengths)
    if k > 1:
        assert len(seen) > 1  # rounds that stopped early and rounds that went further: both paths ran


def test_pad_batch_masks_answers_or_every_position_and_never_padding() -> None:
    lengths, prompt_lens = [9, 5], [3, 2]
    data = FeatureSet.from_sequences([torch.arange(n) + 1 for n in lengths], [torch.randn(n, 8) for n in lengths],
                                     prompt_lens)
    for prompt_positions in (False, True):
        ids, feats, mask = pad_batch(data, [0, 1], prompt_positions)
        assert ids.shape == (2, 9) and feats.shape == (2, 9, 8)
        for row in (0, 1):
            first = 1 if prompt_positions else prompt_lens[row]
            expected = torch.zeros(9, dtype=torch.bool)
            expected[first : lengths[row]] = True
            assert torch.equal(mask[row], expected)
            assert torch.equal(feats[row, : lengths[row]], data.sequence(row)[1].float())


def test_deadline_stops_training_early(teacher, features) -> None:
    head = EagleHead.from_target(teacher)
    history = train(head, features, EagleTrainConfig(steps=50, batch_size=2, warmup_steps=1), None,
                    log=lambda _: None, deadline=0.0)
    assert history["stopped_early_at_step"] == 0 and history["steps"] == []


def test_batched_generation_gives_greedy_answers_and_their_features(teacher) -> None:
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21, 22, 23]]
    eos = 7
    answers, features = generate_with_features(teacher, prompts, 12, eos)
    for prompt, answer, feats in zip(prompts, answers, features, strict=True):
        assert answer == plain_greedy(teacher, prompt, 12, eos)  # left padding changes nothing but rounding
        expected = teacher_features(teacher, torch.tensor(prompt + answer))
        torch.testing.assert_close(feats.float(), expected, atol=5e-3, rtol=5e-3)  # stored as fp16


def _imperfect_head(teacher, seed: int = 2) -> EagleHead:
    """The teacher's head with a perturbed fc: drafts that are sometimes right, sometimes wrong."""
    head = EagleHead.from_target(teacher).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        head.fc.weight.add_(0.05 * torch.randn_like(head.fc.weight))
    return head


def test_draft_passes_are_the_drafters_later_steps(teacher, features) -> None:
    """Pass d at position i = draft step d+1 of a round whose head cache holds positions 0..i-d (true features),
    the earlier drafts being the right tokens: what the unrolled loss trains and draft_acceptance scores."""
    head = _imperfect_head(teacher)
    ids, feats, _ = features.sequence(0)
    with torch.no_grad():
        preds = draft_passes(head, ids[None, 1:], feats[None, :-1].float(), 4)
    for depth in range(1, 4):
        for i in range(depth, ids.numel() - 1, 3):
            cached = i - depth + 1
            drafter = EagleDrafter(head)
            drafter.extend(ids[1 : cached + 1], feats[:cached])
            predicted = drafter.last
            with torch.no_grad():
                for e in range(1, depth + 1):
                    step = head(ids[None, cached + e : cached + e + 1], predicted[None, None], drafter.cache.length,
                                drafter.cache)
                    predicted = step[0, -1]
            torch.testing.assert_close(preds[depth][0, i], predicted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("subset", [False, True])
def test_batched_acceptance_equals_the_replay(teacher, features, subset) -> None:
    head = _imperfect_head(teacher, seed=3)
    rows_ids = torch.randperm(96, generator=torch.Generator().manual_seed(4))[:64] if subset else None
    ks = [1, 2, 4]
    batched = draft_acceptance(head, features, ks, rows_ids, batch_size=5)
    assert batched["sequences"] == len(features) and batched["sequences_left_out"] == 0
    seen = set()
    for k in ks:
        lengths = [n for i in range(len(features)) for n in replay(head, *features.sequence(i), k, rows_ids)]
        seen.update(lengths)
        assert batched[f"k{k}"]["rounds"] == len(lengths)
        assert batched[f"k{k}"]["mean_acceptance_length"] == round(sum(lengths) / len(lengths), 4)
    assert len(seen) > 2  # rounds that stopped at each depth, not one kind only
    late = draft_acceptance(head, features, ks, rows_ids, batch_size=5, deadline=0.0)
    assert late["sequences"] == 0 and late["sequences_left_out"] == len(features)


def test_pad_batch_gathers_from_any_order_of_indices() -> None:
    data = FeatureSet.from_sequences([torch.arange(n) + 1 for n in (3, 7, 4)], [torch.randn(n, 4) for n in (3, 7, 4)],
                                     [1, 2, 3])
    ids, feats, mask = pad_batch(data, [2, 0])
    assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 3, 0]]
    assert mask.tolist() == [[False, False, False, True], [False, True, True, False]]
    assert torch.equal(feats[1, 3], torch.zeros(4)) and torch.equal(feats[0], data.sequence(2)[1].float())


def test_time_schedule_follows_progress_after_warmup() -> None:
    c = EagleTrainConfig(steps=10_000, lr=1.0, warmup_steps=2)
    assert lr_at(0, c, 0.9) == 0.5  # warm-up counts steps whatever the clock says
    assert lr_at(50, c, 0.0) == pytest.approx(1.0) and lr_at(50, c, 1.0) == pytest.approx(0.1)
    assert lr_at(50, c, 0.5) == pytest.approx(0.55)


def test_unroll_outside_the_measured_depths_is_refused() -> None:
    with pytest.raises(ValueError, match="unroll must be 1..5"):
        EagleTrainConfig(unroll=6)


def test_bf16_autocast_training_runs_unrolled_and_lowers_the_loss(teacher, features) -> None:
    """The GPU job's path (bf16 autocast, unroll 2, the clock's schedule) on the CPU's autocast: dtypes meet."""
    head = EagleHead.from_target(teacher)
    config = EagleTrainConfig(steps=20, batch_size=4, lr=3e-3, warmup_steps=2, token_weight=1.0, unroll=2, bf16=True,
                              prompt_positions=True)
    history = train(head, features, config, torch.arange(0, 96, 2), None, log=lambda _: None, seconds=600.0)
    losses = [s["loss"] for s in history["steps"]]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    assert all(p.dtype == torch.float32 for p in head.parameters())  # autocast leaves the master weights fp32
