"""transformers API parity with the backbone: outputs, labels, kwargs, generation; the `compress` argument; chunked
compressed prefill. The oracle is a plain model of the backbone (`Qwen2VLForConditionalGeneration`, ...) holding the
same weights; every test runs on each backbone."""

from __future__ import annotations

import dataclasses
import typing

import backbones
import pytest
import torch
from helpers import plain_twin
from transformers import GenerationConfig
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

from crem_hf import CREMOutput
from crem_hf.testing import make_tiny_crem

# The per-backbone fixtures (they override the session's Qwen2-VL ones here): each test runs on every backbone.
backbone = backbones.backbone
generation_batch = backbones.generation_batch
model = backbones.model
processor = backbones.processor


@pytest.fixture(scope="module")
def eager(processor, backbone):
    return make_tiny_crem(processor, seed=0, backbone=backbone, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def twin(model):
    return plain_twin(model)


@pytest.fixture(scope="module")
def labelled(processor, images):
    """Two left-padded rows with images, questions and answers (labels on the answers)."""
    return dict(
        processor.process_generation_inputs(
            questions=["What is it?", "Which digit is shown? Answer in one word."],
            images=images,
            answers=["a cat", "seven"],
        )
    )


def without(batch: dict, *keys: str) -> dict:
    return {k: v for k, v in batch.items() if k not in keys}


def assert_same(ours, theirs, what: str) -> None:
    if isinstance(theirs, torch.Tensor):
        assert torch.equal(ours, theirs), what
    elif isinstance(theirs, (tuple, list)):
        assert len(ours) == len(theirs), what
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{what}[{i}]")


# ---------------------------------------------------------------- forward


def test_output_holds_every_qwen2vl_field_first_and_in_order():
    ours = [f.name for f in dataclasses.fields(CREMOutput)]
    theirs = [f.name for f in dataclasses.fields(MultimodalCausalLMOutputWithPast)]
    assert ours[: len(theirs)] == theirs
    assert {"lm_loss", "supervised_logits", "embeddings"} <= set(ours[len(theirs) :])
    assert issubclass(CREMOutput, MultimodalCausalLMOutputWithPast)


def test_forward_outputs_equal_qwen2vl_with_and_without_labels(model, twin, labelled):
    """Same loss (exactly), `(batch, length, vocab)` logits, cache and image outputs, labels or not."""
    with torch.no_grad():
        for batch in (without(labelled, "labels"), labelled):
            ours, theirs = model(**batch), twin(**batch)
            assert ours.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
            assert torch.equal(ours.logits, theirs.logits)
            assert ours.cache is not None and ours.cache.get_seq_length() == batch["input_ids"].shape[1]
            assert torch.equal(ours.cache.layers[0].keys, theirs.cache.layers[0].keys)
            assert_same(ours.image_outputs.pooler_output, theirs.image_outputs.pooler_output, "image_outputs")
            assert ours.video_outputs is None
        assert torch.equal(ours.loss, theirs.loss)
        assert ours.lm_loss is ours.loss
        assert ours.supervised_logits is None and ours.embeddings is None


def test_return_dict_false_gives_qwen2vl_tuple(model, twin, labelled):
    with torch.no_grad():
        ours = model(**labelled, return_dict=False)
        theirs = twin(**labelled, return_dict=False)
    assert isinstance(ours, tuple)
    # Qwen2-VL's fields first, in its order; then CREM's non-None ones (lm_loss).
    assert len(ours) == len(theirs) + 1
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert torch.equal(ours[-1], theirs[0])
    with torch.no_grad():
        embedding = model(**without(labelled, "labels"), return_embeddings=True, return_dict=False)
    assert isinstance(embedding, tuple) and embedding[-1].shape == (2, model.config.text_config.hidden_size)


def test_inputs_embeds_with_labels_and_cache_continuation(model, twin, labelled):
    """inputs_embeds + labels works as in Qwen2-VL, and the cache of a labelled forward continues decoding."""
    for m in (model, twin):
        m.model.rope_deltas = None  # Qwen2-VL keeps these from its previous call (an earlier test's generate)
    text = {k: labelled[k][1:, -6:] for k in ("input_ids", "attention_mask", "labels")}
    embeds = model.get_input_embeddings()(text["input_ids"])
    with torch.no_grad():
        ours = model(inputs_embeds=embeds, attention_mask=text["attention_mask"], labels=text["labels"])
        theirs = twin(inputs_embeds=embeds, attention_mask=text["attention_mask"], labels=text["labels"])
        assert torch.equal(ours.loss, theirs.loss) and torch.equal(ours.logits, theirs.logits)
        # One more token after the labelled prompt, from the labelled forward's cache.
        step = labelled["input_ids"][:, -1:] * 0 + 100
        ids = torch.cat([labelled["input_ids"], step], 1)
        mask = torch.cat([labelled["attention_mask"], torch.ones_like(step)], 1)
        types = torch.cat([labelled["mm_token_type_ids"], torch.zeros_like(step)], 1)
        positions = model.compute_position_ids(ids, mask, labelled["image_grid_thw"], types)[..., -1:]
        continued = []
        for m in (model, twin):
            head = m(**labelled)
            continued.append(m(input_ids=step, attention_mask=mask, position_ids=positions, cache=head.cache).logits)
        images = without(labelled, "labels", "input_ids", "attention_mask", "mm_token_type_ids")
        full = twin(**images, input_ids=ids, attention_mask=mask, mm_token_type_ids=types)
    assert continued[0].shape == (2, 1, model.config.text_config.vocab_size)
    assert torch.equal(continued[0], continued[1])
    assert (continued[0] - full.logits[:, -1:]).abs().max() < 1e-5


def test_attentions_hidden_states_and_kwargs_annotation_like_qwen2vl(eager, labelled):
    twin = plain_twin(eager)
    with torch.no_grad():
        ours = eager(**labelled, output_attentions=True, output_hidden_states=True, return_dict=False)
        theirs = twin(**labelled, output_attentions=True, output_hidden_states=True, return_dict=False)
    assert len(ours) == len(theirs) + 1  # + lm_loss
    assert_same(ours[: len(theirs)], theirs, "tuple")
    attentions = ours[4]
    assert len(attentions) == eager.config.text_config.num_hidden_layers
    length = labelled["input_ids"].shape[1]
    assert attentions[0].shape == (2, eager.config.text_config.num_attention_heads, length, length)
    hints = typing.get_type_hints(type(eager).forward)
    assert hints["kwargs"] == typing.get_type_hints(eager._backbone_class.forward)["kwargs"]


def test_training_step_with_gradient_checkpointing_equals_qwen2vl(processor, backbone, labelled):
    model = make_tiny_crem(processor, seed=2, backbone=backbone).train()
    twin = plain_twin(model).train()
    grads = []
    for m in (model, twin):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = m(**labelled)
        out.loss.backward()
        grads.append((out.loss.detach(), out.logits.shape, m.lm_head.weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert grads[0][1] == grads[1][1] == (*labelled["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.equal(grads[0][2], grads[1][2])


def test_supervised_logits_only_is_sparse_and_gives_the_same_loss(model, twin, labelled):
    flags = torch.tensor([True, False])
    calls = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: calls.append(tuple(output.shape)))
    try:
        with torch.no_grad():
            sparse = model(**labelled, supervised_logits_only=True)
            full = model(**labelled)
            mixed_sparse = model(**labelled, compress=flags, supervised_logits_only=True)
            mixed_full = model(**labelled, compress=flags)
    finally:
        hook.remove()
    supervised = labelled["labels"][:, 1:] != -100
    vocab = model.config.text_config.vocab_size
    assert calls[0] == (int(supervised.sum()), vocab) and calls[2] == calls[0], "sparse calls stay sparse"
    assert sparse.logits is None and sparse.supervised_logits.shape == calls[0]
    assert torch.allclose(sparse.supervised_logits, full.logits[:, :-1][supervised], atol=1e-5)
    assert torch.allclose(sparse.loss, twin(**labelled).loss, atol=1e-6)
    assert mixed_full.logits.shape == (*labelled["input_ids"].shape, vocab)
    assert torch.allclose(mixed_sparse.supervised_logits, mixed_full.logits[:, :-1][supervised], atol=1e-5)
    assert torch.allclose(mixed_sparse.loss, mixed_full.loss, atol=1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        model(**without(labelled, "labels"), supervised_logits_only=True)


def test_trainer_lm_loss_never_builds_full_logits(processor, backbone, tmp_path):
    from helpers import mixed_batch

    from crem_hf.training import CREMTrainer, CREMTrainingArguments

    model = make_tiny_crem(processor, seed=1, backbone=backbone).train()
    batch = mixed_batch(processor, rows=range(2), generation_rows=range(4), compress=[True, False, True, False])
    args = CREMTrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        retrieval_batch_size=2,
        generation_batch_size=4,
        gradient_cache_chunk_size=None,
        alpha_r=0.0,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = CREMTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    try:
        loss = trainer.training_step(trainer.model, batch)
    finally:
        hook.remove()
    generation, flags = batch.generation.inputs, batch.generation.compress
    supervised = int((generation["labels"][:, 1:] != -100).sum())
    assert shapes == [(supervised, model.config.text_config.vocab_size)]
    with torch.no_grad():
        default = model(**generation, compress=flags)  # the default keeps Qwen2-VL's meaning of logits
    assert default.logits.shape == (*generation["input_ids"].shape, model.config.text_config.vocab_size)
    assert float(loss) == pytest.approx(0.5 * float(default.loss), rel=1e-5)


# ---------------------------------------------------------------- generation


GENERATION_OPTIONS = {
    "greedy": {"do_sample": False},
    "sampling": {"do_sample": True, "top_k": 0, "num_return_sequences": 2},
    "beam": {"num_beams": 2, "num_return_sequences": 2, "do_sample": False},
    "scores": {"do_sample": False, "output_scores": True},
}


@pytest.mark.parametrize("name", list(GENERATION_OPTIONS))
def test_native_generate_equals_qwen2vl_with_chorus_suppressed(model, twin, generation_batch, name):
    """Positional `inputs` and `generation_config` as in Qwen2-VL; every output field equal."""
    options = {**GENERATION_OPTIONS[name], "max_new_tokens": 4, "return_dict_in_generate": True, "output_logits": True}
    chorus = model.config.chorus_token_ids
    rest = without(generation_batch, "input_ids")
    results = []
    for m, extra in ((model, {}), (twin, {"suppress_tokens": chorus})):
        torch.manual_seed(0)
        config = GenerationConfig(**{**model.generation_config.to_dict(), **options, **extra})
        results.append(m.generate(generation_batch["input_ids"], config, **rest))
    ours, theirs = results
    assert type(ours) is type(theirs)
    for field in ("sequences", "scores", "logits", "sequences_scores", "beam_indices"):
        if getattr(theirs, field, None) is not None:
            assert_same(getattr(ours, field), getattr(theirs, field), field)


# ---------------------------------------------------------------- the compress argument


@pytest.mark.parametrize(
    "bad",
    [
        "no",
        "",
        1,
        0,
        1.0,
        [True, False],
        torch.tensor([1, 0]),
        torch.tensor([True]),
        torch.tensor(True),
        torch.tensor([[True, False]]),
    ],
    ids=["str", "empty-str", "int-1", "int-0", "float", "list", "int-tensor", "short", "0-d", "2-d"],
)
def test_compress_accepts_only_bool_or_row_flags(model, generation_batch, bad):
    for call in (
        lambda: model(**generation_batch, compress=bad),
        lambda: model.generate(**generation_batch, compress=bad, max_new_tokens=1),
    ):
        with pytest.raises((TypeError, ValueError), match=r"compress must be .*bool"):
            call()


def test_generate_compresses_the_flagged_rows_only(model, processor, images, generation_batch):
    flags = torch.tensor([True, False])
    options = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    mixed = model.generate(**generation_batch, compress=flags, **options)
    compressed = model.generate(**generation_batch, compress=True, **options)
    native = model.generate(**generation_batch, compress=False, **options)
    assert torch.equal(mixed.sequences[0], compressed.sequences[0])
    assert torch.equal(mixed.sequences[1], native.sequences[1])
    for ours, c, n in zip(mixed.logits, compressed.logits, native.logits, strict=True):
        assert (ours[0] - c[0]).abs().max() < 1e-4 and (ours[1] - n[1]).abs().max() < 1e-4
    assert not torch.allclose(compressed.logits[0][1], native.logits[0][1], atol=1e-3)
    all_false = model.generate(**generation_batch, compress=torch.tensor([False, False]), **options)
    assert torch.equal(all_false.sequences, native.sequences)


# ---------------------------------------------------------------- chunked compressed prefill


def query_lengths(model):
    """Record the query length of every language-model forward."""
    lengths = []

    def record(module, args, kwargs):
        tensor = kwargs.get("inputs_embeds")
        lengths.append((tensor if tensor is not None else kwargs["input_ids"]).shape[1])

    return lengths, model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("tails", ["equal", "different"])
def test_compressed_prefill_runs_in_chunks_with_the_same_result(model, processor, images, tails):
    questions = ["What is shown in this image? " * 3] * 2 if tails == "equal" else ["Why? " * 9, "What is it?"]
    batch = processor.process_generation_inputs(questions=questions, images=images, texts=["a cat", None])
    layout = model.chorus_layout(batch["input_ids"], batch["attention_mask"])
    assert bool((layout.chorus_end == layout.chorus_end[0]).all()) == (tails == "equal")
    options = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    whole = model.generate(**batch, compress=True, **options)
    lengths, hook = query_lengths(model)
    model.prefill_chunk_size = 5
    try:
        chunked = model.generate(**batch, compress=True, **options)
    finally:
        del model.prefill_chunk_size
        hook.remove()
    assert max(lengths) <= 5 and len(lengths) > batch["input_ids"].shape[1] // 5
    assert torch.equal(chunked.sequences, whole.sequences)
    for a, b in zip(chunked.logits, whole.logits, strict=True):
        assert (a - b).abs().max() < 1e-5


def test_followups_prefill_in_chunks_with_the_same_result(model, processor, images):
    context = model.compress(**processor.process_embedding_inputs(images=images[1:]))
    followups = processor.process_followups(
        questions=["Which digit is shown? Answer in one word, please. " * 2, "Why?"]
    )
    options = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    whole = model.generate(context=context, **followups, **options)
    lengths, hook = query_lengths(model)
    model.prefill_chunk_size = 4
    try:
        chunked = model.generate(context=context, **followups, **options)
    finally:
        del model.prefill_chunk_size
        hook.remove()
    assert max(lengths) <= 4
    assert torch.equal(chunked.sequences, whole.sequences)
    for a, b in zip(chunked.logits, whole.logits, strict=True):
        assert (a - b).abs().max() < 1e-5
    with pytest.raises(ValueError, match="compress unset"):
        model.generate(context=context, **followups, compress=False, max_new_tokens=1)
