"""Loss modules against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from crem_hf.training import InfoNCELoss, MatryoshkaInfoNCELoss, RetrievalBatch
from crem_hf.training import losses as losses_module
from crem_hf.training.gradcache import GradientCache, split_embedding_batch


def test_identical_embeddings_give_log_batch_size():
    loss = InfoNCELoss(temperature=0.02)
    same = torch.nn.functional.normalize(torch.ones(5, 8), dim=-1)
    assert loss(same, same).loss.item() == pytest.approx(math.log(5), abs=1e-6)
    negatives = same[:3]
    assert loss(same, same, negatives).loss.item() == pytest.approx(math.log(8), abs=1e-6)


def test_two_orthogonal_pairs_closed_form():
    loss = InfoNCELoss(temperature=1.0)
    eye = torch.eye(2)
    out = loss(eye, eye)
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert out.accuracy.item() == 1.0
    swapped = loss(eye, eye.flip(0))
    assert swapped.loss.item() == pytest.approx(math.log(1 + math.exp(1)), abs=1e-6)
    assert swapped.accuracy.item() == 0.0


def test_duplicate_targets_are_not_negatives():
    loss = InfoNCELoss(temperature=0.02)
    same = torch.nn.functional.normalize(torch.ones(3, 4), dim=-1)
    keys = torch.tensor([7, 7, 9])  # rows 0 and 1 share a label text
    value = loss(same, same, positive_keys=keys).loss.item()
    assert value == pytest.approx((math.log(2) + math.log(2) + math.log(3)) / 3, abs=1e-6)
    negative_keys = torch.tensor([9])  # a hard negative equal to row 2's positive is not its negative either
    value = loss(same, same, same[:1], positive_keys=keys, negative_keys=negative_keys).loss.item()
    assert value == pytest.approx((math.log(3) + math.log(3) + math.log(3)) / 3, abs=1e-6)


def test_rank_offset_points_at_this_process_positives(monkeypatch):
    """As rank 1 of 2: the gathered targets hold rank 0's positives first."""
    other = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    monkeypatch.setattr(losses_module, "rank", lambda: 1)
    monkeypatch.setattr(losses_module, "all_gather_with_grad", lambda t: torch.cat([other, t]))
    mine = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = InfoNCELoss(temperature=1.0)
    out = loss(mine, mine)
    # Logits [0, 0, 1, 1] with the positive at offset 2 + i: -log(e / (2 + 2e)).
    expected = -math.log(math.e / (2 * math.e + 2))
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)


def test_lm_loss_counts_only_labelled_tokens(model, processor, images):
    batch = processor.process_generation_inputs(questions=["Q?", "Q?"], images=images, answers=["a cat", "seven"])
    with torch.no_grad():
        logits = torch.nn.functional.log_softmax(
            super(type(model), model).forward(**{k: v for k, v in batch.items() if k != "labels"}).logits, -1
        )
        targets = batch["labels"][:, 1:]
        picked = logits[:, :-1].gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        expected = -(picked * (targets != -100)).sum() / (targets != -100).sum()
        assert model(**batch, compress=False).loss.item() == pytest.approx(expected.item(), abs=1e-5)
        only_first = batch["labels"].clone()
        only_first[1] = -100
        expected_first = -(picked[0] * (targets[0] != -100)).sum() / (targets[0] != -100).sum()
        loss_first = model(**{**batch, "labels": only_first}, compress=False).loss
        assert loss_first.item() == pytest.approx(expected_first.item(), abs=1e-5)
        nothing = torch.full_like(batch["labels"], -100)
        # The trainer's sparse path gives 0 for a batch without labelled tokens (Qwen2-VL's own loss gives NaN).
        assert model(**{**batch, "labels": nothing}, compress=False, supervised_logits_only=True).loss.item() == 0.0


def test_positives_of_identical_queries_are_not_negatives():
    loss = InfoNCELoss(temperature=0.02)
    same = torch.nn.functional.normalize(torch.ones(3, 4), dim=-1)
    query_keys = torch.tensor([1, 1, 2])  # queries 0 and 1 are the same text asked of two images
    value = loss(same, same, query_keys=query_keys).loss.item()
    assert value == pytest.approx((math.log(2) + math.log(2) + math.log(3)) / 3, abs=1e-6)


def test_infonce_takes_cosines_of_raw_embeddings():
    """Unnormalised inputs: the logits are cosines over the temperature, not dot products."""
    queries = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    positives = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    # cosines: query 0 -> (1/sqrt2, 0), query 1 -> (1/sqrt2, 1); temperature 0.5 doubles them
    c = 2 / math.sqrt(2)
    expected = (-math.log(math.exp(c) / (math.exp(c) + 1)) - math.log(math.exp(2) / (math.exp(c) + math.exp(2)))) / 2
    loss = InfoNCELoss(temperature=0.5)
    assert loss(queries, positives).loss.item() == pytest.approx(expected, abs=1e-6)
    unit = torch.nn.functional.normalize
    assert loss(unit(queries, dim=-1), unit(positives, dim=-1)).loss.item() == pytest.approx(expected, abs=1e-6)
    negatives = torch.tensor([[-4.0, 0.0]])  # cosine -1 with query 0, 0 with query 1
    with_negative = (
        -math.log(math.exp(c) / (math.exp(c) + 1 + math.exp(-2)))
        - math.log(math.exp(2) / (math.exp(c) + math.exp(2) + 1))
    ) / 2
    assert loss(queries, positives, negatives).loss.item() == pytest.approx(with_negative, abs=1e-6)


def test_compute_loss_keeps_a_float64_model_in_float64(processor, tmp_path):
    from helpers import mixed_batch

    from crem_hf.testing import make_tiny_crem
    from crem_hf.training import CREMTrainer, CREMTrainingArguments, StepBatch

    model = make_tiny_crem(processor, seed=0).double()
    args = CREMTrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, gradient_cache_chunk_size=None, save_strategy="no"
    )
    trainer = CREMTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1
    batch = mixed_batch(processor, rows=range(3), generation_rows=range(2), compress=[True, False])
    for part in (batch.retrieval.query, batch.generation.inputs):
        part["pixel_values"] = part["pixel_values"].double()
    for inputs in (StepBatch(generation=batch.generation), batch):
        loss = trainer.compute_loss(model, inputs)
        assert loss.dtype == torch.float64 and loss.requires_grad


def test_the_training_arguments_own_the_temperature(processor, tmp_path):
    """The loss takes the arguments' temperature; the model's config records no training setting."""
    from crem_hf.testing import make_tiny_crem
    from crem_hf.training import CREMTrainer, CREMTrainingArguments

    model = make_tiny_crem(processor, seed=0)
    args = CREMTrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, temperature=0.1, save_strategy="no"
    )
    trainer = CREMTrainer(model=model, args=args)
    assert trainer.contrastive.loss.temperature == 0.1
    assert "contrastive_temperature" not in model.config.to_dict()


# ---------------------------------------------------------------- Matryoshka


def test_matryoshka_loss_is_the_weighted_mean_over_renormalised_prefixes_closed_form():
    # At 2 dims both rows are (1, 0): every score is 1, each query's loss log 2, and the tie goes to row 0.
    # At 4 dims the unit rows (1, 0, 0, 1)/sqrt2 and (1, 0, 1, 0)/sqrt2 have cosine 1/2: log(1 + e^-0.5) each.
    rows = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    at_2, at_4 = math.log(2), math.log(1 + math.exp(-0.5))
    out = MatryoshkaInfoNCELoss(temperature=1.0, dims=[2, 4])(rows, rows)
    assert out.loss.item() == pytest.approx((at_2 + at_4) / 2, abs=1e-6)
    assert [d.item() for d in out.dim_losses] == pytest.approx([at_2, at_4], abs=1e-6)
    assert [a.item() for a in out.dim_accuracies] == [0.5, 1.0]
    assert out.accuracy.item() == 1.0  # at the largest dim
    weighted = MatryoshkaInfoNCELoss(temperature=1.0, dims=[2, 4], weights=[1.0, 3.0])(rows, rows)
    assert weighted.loss.item() == pytest.approx((at_2 + 3 * at_4) / 4, abs=1e-6)
    # Scaling a row (as normalising the full vector does) changes no prefix's cosine.
    scaled = MatryoshkaInfoNCELoss(temperature=1.0, dims=[2, 4])(rows * torch.tensor([[3.0], [0.5]]), rows)
    assert scaled.loss.item() == pytest.approx(out.loss.item(), abs=1e-6)


def test_matryoshka_at_the_full_width_alone_is_the_plain_infonce():
    generator = torch.Generator().manual_seed(0)
    queries, targets, negatives = (torch.randn(n, 8, generator=generator) for n in (4, 4, 3))
    keys = {"positive_keys": torch.tensor([1, 2, 1, 3]), "negative_keys": torch.tensor([2, 5, 6])}
    plain = InfoNCELoss(temperature=0.05)(queries, targets, negatives, **keys)
    matryoshka = MatryoshkaInfoNCELoss(temperature=0.05, dims=[8])(queries, targets, negatives, **keys)
    assert matryoshka.loss.item() == pytest.approx(plain.loss.item(), rel=1e-7)
    assert matryoshka.accuracy.item() == plain.accuracy.item()


def test_matryoshka_gathers_once_at_full_width_and_keeps_the_rank_offset(monkeypatch):
    other = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    gathered = []

    def gather(tensor):
        gathered.append(tuple(tensor.shape))
        return torch.cat([other, tensor])

    monkeypatch.setattr(losses_module, "rank", lambda: 1)
    monkeypatch.setattr(losses_module, "all_gather_with_grad", gather)
    mine = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    out = MatryoshkaInfoNCELoss(temperature=1.0, dims=[2, 3])(mine, mine)
    assert gathered == [(2, 3)]
    # At 2 dims as in test_rank_offset_points_at_this_process_positives (logits [0, 0, 1, 1], positive at 2 + i);
    # at 3 the cosine with rank 0's rows is 1/2: logits [0.5, 0.5, 1, 1].
    at_2 = -math.log(math.e / (2 * math.e + 2))
    at_3 = -math.log(math.e / (2 * math.e + 2 * math.exp(0.5)))
    assert out.loss.item() == pytest.approx((at_2 + at_3) / 2, abs=1e-6)


@pytest.mark.parametrize(
    ("dims", "weights", "message"),
    [
        ([4, 2], None, "strictly increasing"),
        ([0, 2], None, "positive"),
        ([2, 4], [1.0], "1 weights for 2 dims"),
        ([2, 4], [0.0, 0.0], "not all 0"),
        ([2, 4], [-1.0, 2.0], ">= 0"),
    ],
)
def test_matryoshka_loss_refuses_bad_dims_and_weights(dims, weights, message):
    with pytest.raises(ValueError, match=message):
        MatryoshkaInfoNCELoss(temperature=1.0, dims=dims, weights=weights)
    with pytest.raises(ValueError, match="Matryoshka dim 8 is larger than the embeddings"):
        MatryoshkaInfoNCELoss(temperature=1.0, dims=[2, 8])(torch.ones(2, 4), torch.ones(2, 4))


# ---------------------------------------------------------------- gradient cache

VISION_START = 19  # no token of the toy sides: they have no images


class ToyEncoder(torch.nn.Module):
    """Embeddings `(rows, 8)`: the masked mean of dropped-out token embeddings (dropout: the random state matters)."""

    def __init__(self, dropout: float):
        super().__init__()
        torch.manual_seed(0)
        self.tokens = torch.nn.Embedding(VISION_START, 8)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return (self.dropout(self.tokens(inputs["input_ids"])) * mask).sum(1) / mask.sum(1)


def toy_retrieval_batch():
    """6 queries, 6 targets (two share a key) and 3 negatives of left-padded token ids."""
    generator = torch.Generator().manual_seed(0)

    def side(rows: int) -> dict[str, torch.Tensor]:
        lengths = torch.randint(1, 6, (rows,), generator=generator)
        mask = (torch.arange(5)[None, :] >= 5 - lengths[:, None]).long()
        return {
            "input_ids": torch.randint(1, VISION_START, (rows, 5), generator=generator) * mask,
            "attention_mask": mask,
        }

    return RetrievalBatch(
        query=side(6),
        target=side(6),
        negative=side(3),
        target_keys=torch.tensor([0, 1, 2, 3, 4, 1]),
        negative_keys=torch.tensor([7, 8, 9]),
    )


def toy_losses():
    return [InfoNCELoss(temperature=0.1), MatryoshkaInfoNCELoss(temperature=0.1, dims=[4, 8], weights=[1.0, 2.0])]


def cached_step(loss, encoder, batch, chunk_size):
    """The gradient cache's loss and the encoder's gradient after it and its returned loss are back-propagated."""
    encoder.zero_grad(set_to_none=True)
    calls = []

    def backward(term):
        calls.append(term.detach())
        term.backward()

    torch.manual_seed(1)
    out = GradientCache(loss, chunk_size, VISION_START)(encoder, batch, backward)
    out.loss.backward()
    return out, encoder.tokens.weight.grad.clone(), len(calls)


@pytest.mark.parametrize("loss", toy_losses(), ids=["infonce", "matryoshka"])
def test_gradient_cache_loss_and_gradient_equal_the_whole_batch(loss):
    encoder, batch = ToyEncoder(dropout=0.0), toy_retrieval_batch()
    whole = loss(*(encoder(side) for side in batch.sides().values()), batch.target_keys, batch.negative_keys)
    whole.loss.backward()
    expected = encoder.tokens.weight.grad.clone()
    out, gradient, calls = cached_step(loss, encoder, batch, chunk_size=4)
    assert out.loss.item() == pytest.approx(whole.loss.item(), rel=1e-6)
    assert out.accuracy.item() == whole.accuracy.item()
    assert type(out) is type(whole)
    assert calls == 2 + 2 + 1 - 1, "chunks of 4 + 2 queries, 4 + 2 targets, 3 negatives: all but the last"
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)
    assert expected.abs().sum() > 0
    # No chunking (None, or a chunk as large as the largest side): the wrapped loss as it is, with its graph.
    for chunk_size in (None, 6):
        plain, plain_gradient, plain_calls = cached_step(loss, encoder, batch, chunk_size)
        assert plain_calls == 0 and plain.loss.item() == pytest.approx(whole.loss.item(), rel=1e-7)
        torch.testing.assert_close(plain_gradient, expected, rtol=1e-6, atol=1e-8)


def test_gradient_cache_replays_each_chunk_s_dropout():
    """With dropout, the cache's gradient is that of the same chunked forwards run with a graph, from one seed."""
    loss, encoder, batch = InfoNCELoss(temperature=0.1), ToyEncoder(dropout=0.5), toy_retrieval_batch()
    torch.manual_seed(1)
    chunked = {
        name: torch.cat([encoder(chunk) for chunk in split_embedding_batch(side, 4, VISION_START)])
        for name, side in batch.sides().items()
    }
    oracle = loss(chunked["query"], chunked["target"], chunked["negative"], batch.target_keys, batch.negative_keys)
    oracle.loss.backward()
    expected = encoder.tokens.weight.grad.clone()
    out, gradient, _ = cached_step(loss, encoder, batch, chunk_size=4)
    assert out.loss.item() == pytest.approx(oracle.loss.item(), rel=1e-6)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


def test_gradient_cache_refuses_a_chunk_size_below_one():
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        GradientCache(InfoNCELoss(temperature=0.1), 0, VISION_START)
