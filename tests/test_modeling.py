"""The model core: compression mask, exact compressed generation, no leak, native parity, embeddings; on every
backbone (the module's fixtures are built per backbone: Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""

from __future__ import annotations

import backbones
import pytest
import torch
from helpers import dense_compression_mask, dense_oracle_states, greedy_with_logits, plain_twin, random_image
from transformers import GenerationConfig

NEW_TOKENS = 6

# The per-backbone fixtures (they override the session's Qwen2-VL ones here): each test runs on every backbone.
any_attention_model = backbones.any_attention_model
backbone = backbones.backbone
generation_batch = backbones.generation_batch
model = backbones.model
processor = backbones.processor


def reference_compressed_logits(model, batch, new_tokens: torch.Tensor) -> torch.Tensor:
    """Per-step logits `(batch, steps, vocab)` of one no-cache forward over prompt + answer under the dense mask."""
    ids = torch.cat([batch["input_ids"], new_tokens], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(new_tokens)], 1)
    full = {"input_ids": ids, "attention_mask": mask, **{k: batch[k] for k in ("pixel_values", "image_grid_thw")}}
    with torch.no_grad():
        logits = model.lm_head(dense_oracle_states(model, full, compress=True))
    prompt = batch["input_ids"].shape[1]
    return logits[:, prompt - 1 : prompt - 1 + new_tokens.shape[1]]


@pytest.mark.parametrize("tails", ["different", "equal"])
def test_compressed_generation_equals_masked_forward(any_attention_model, processor, images, generation_batch, tails):
    """Rows whose chorus blocks end at different slots are re-packed first; equal tails run in place."""
    model = any_attention_model
    if tails == "equal":
        generation_batch = processor.process_generation_inputs(
            questions=["What is shown?"] * 2, images=images, texts=["a cat", None]
        )
    layout = model.chorus_layout(generation_batch["input_ids"], generation_batch["attention_mask"])
    assert bool((layout.chorus_end == layout.chorus_end[0]).all()) == (tails == "equal")
    assert generation_batch["attention_mask"][0, 0] == 0, "the fixture must exercise left padding"
    sequences, steps = greedy_with_logits(model, generation_batch, NEW_TOKENS, compress=True)
    prompt = generation_batch["input_ids"]
    assert torch.equal(sequences[:, : prompt.shape[1]], prompt)
    new_tokens = sequences[:, prompt.shape[1] :]
    assert new_tokens.shape == (2, NEW_TOKENS)
    reference = reference_compressed_logits(model, generation_batch, new_tokens)
    assert (steps - reference).abs().max() < 1e-4
    # Greedy picks the reference argmax (chorus ids suppressed).
    reference[..., model.config.chorus_token_ids] = float("-inf")
    assert torch.equal(reference.argmax(-1), new_tokens)


def test_compressed_context_holds_exactly_the_kept_slots(model, processor, generation_batch):
    """
    The context's ids, MRoPE positions (the backbone's own, interleaved on Qwen3-VL) and every layer's keys and
    values are those of the kept columns in one dense-mask forward with a cache: the oracle.
    """
    context = model.compress(**{k: v for k, v in generation_batch.items()})
    ids, mask = generation_batch["input_ids"], generation_batch["attention_mask"]
    layout = model.chorus_layout(ids, mask)
    positions = model.compute_position_ids(ids, mask, generation_batch["image_grid_thw"])
    with torch.no_grad():
        oracle = model.model(
            input_ids=ids,
            attention_mask=dense_compression_mask(model, ids, mask, True),
            position_ids=positions,
            pixel_values=generation_batch["pixel_values"],
            image_grid_thw=generation_batch["image_grid_thw"],
            use_cache=True,
        ).cache
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()]
        pad = ids.shape[1] - len(real)
        start = int(layout.chorus_start[row] - pad)
        header_end = int(layout.span_start[row] - pad)
        expected = torch.cat([real[:header_end], real[start:]])
        valid = context.attention_mask[row].bool()
        kept = context.input_ids[row][valid]
        assert torch.equal(kept, expected)
        columns = torch.cat([torch.arange(header_end), torch.arange(start, len(real))]) + pad
        assert torch.equal(context.position_ids[:, row][:, valid], positions[:, row, columns])
        for ours, theirs in zip(context.cache.layers, oracle.layers, strict=True):
            cached = valid[: ours.keys.shape[2]]
            assert (ours.keys[row][:, cached] - theirs.keys[row][:, columns]).abs().max() <= 1e-5
            assert (ours.values[row][:, cached] - theirs.values[row][:, columns]).abs().max() <= 1e-5
        assert model.config.image_token_id not in kept.tolist()
        assert processor.tokenizer.decode(real[header_end - 2 : header_end]) == "user\n"
    assert context.cache.get_seq_length() == context.input_ids.shape[1]
    assert context.cache.get_seq_length() == int(context.attention_mask.sum(1).max())
    assert context.cache.get_seq_length() < ids.shape[1] - 16, "the image and the input text must be gone"


def tail_logits(model, batch, garbage: bool, compress: bool) -> torch.Tensor:
    """Logits of the tokens after the chorus block, continuing from a cache whose compressed span may be garbage."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    layout = model.chorus_layout(ids, mask)
    split = int(layout.chorus_end.max())
    assert torch.all(layout.chorus_end == split), "needs rows whose chorus block ends at the same slot"
    positions = model.compute_position_ids(ids, mask, batch["image_grid_thw"])
    full_mask = dense_compression_mask(model, ids, mask, compress)
    with torch.no_grad():
        head = model.model(
            input_ids=ids[:, :split],
            attention_mask=full_mask[..., :split, :split],
            position_ids=positions[..., :split],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            use_cache=True,
        )
        span = layout.compressed_span(split)
        if garbage:
            generator = torch.Generator().manual_seed(0)
            for layer in head.cache.layers:
                for tensor in (layer.keys, layer.values):
                    noise = torch.randn(tensor.shape, generator=generator) * 100
                    tensor.copy_(torch.where(span[:, None, :, None], noise, tensor))
        tail = model.model(
            input_ids=ids[:, split:],
            attention_mask=full_mask[..., split:, :],
            position_ids=positions[..., split:],
            cache=head.cache,
        )
    return model.lm_head(tail.last_hidden_state)


def test_compressed_answer_depends_on_the_input_only_through_the_chorus(model, processor, images):
    # Same question length, so the chorus blocks end at the same slot in both rows.
    batch = processor.process_generation_inputs(questions=["What is shown?"] * 2, images=images, texts=["a cat", None])
    clean = tail_logits(model, batch, garbage=False, compress=True)
    dirty = tail_logits(model, batch, garbage=True, compress=True)
    assert (clean - dirty).abs().max() == 0
    native_clean = tail_logits(model, batch, garbage=False, compress=False)
    native_dirty = tail_logits(model, batch, garbage=True, compress=False)
    assert (native_clean - native_dirty).abs().max() > 1e-2


@pytest.mark.parametrize("do_sample", [False, True])
def test_native_generation_is_the_plain_backbone(model, generation_batch, do_sample):
    plain = plain_twin(model)
    chorus = model.config.chorus_token_ids
    options = {"max_new_tokens": 8, "do_sample": do_sample, "output_logits": True, "return_dict_in_generate": True}
    torch.manual_seed(3)
    ours = model.generate(**generation_batch, **options)
    torch.manual_seed(3)
    theirs = plain.generate(**generation_batch, **options, suppress_tokens=chorus)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits, strict=True))
    ours = ours.sequences
    torch.manual_seed(3)
    unsuppressed = plain.generate(**generation_batch, max_new_tokens=8, do_sample=do_sample)
    new = ours[:, generation_batch["input_ids"].shape[1] :]
    assert not torch.isin(new, torch.tensor(chorus)).any()
    if not torch.isin(unsuppressed, torch.tensor(chorus)).any():
        assert torch.equal(ours, unsuppressed)


def test_compressed_generation_never_emits_chorus_ids(model, generation_batch):
    model.lm_head.weight.data[model.config.chorus_token_ids] += 50.0  # make chorus ids the model's favourites
    try:
        out = model.generate(**generation_batch, compress=True, max_new_tokens=4, do_sample=False)
    finally:
        model.lm_head.weight.data[model.config.chorus_token_ids] -= 50.0
    new = out[:, generation_batch["input_ids"].shape[1] :]
    assert not torch.isin(new, torch.tensor(model.config.chorus_token_ids)).any()


def test_compressed_sampling_and_multiple_sequences(model, generation_batch):
    torch.manual_seed(0)
    out = model.generate(
        **generation_batch, compress=True, max_new_tokens=4, do_sample=True, num_return_sequences=3, top_k=0
    )
    assert out.shape[0] == 6
    assert torch.equal(
        out[:3, : generation_batch["input_ids"].shape[1]], generation_batch["input_ids"][:1].expand(3, -1)
    )
    beams = model.generate(**generation_batch, compress=True, max_new_tokens=4, num_beams=2)
    assert beams.shape[0] == 2


def test_compressed_beam_search_scores_equal_the_dense_oracle(model, generation_batch):
    """Every returned beam's score is the sum of its tokens' log-probabilities under the dense compression mask."""
    out = model.generate(
        **generation_batch,
        compress=True,
        max_new_tokens=4,
        num_beams=3,
        num_return_sequences=2,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    prompt = generation_batch["input_ids"]
    new_tokens = out.sequences[:, prompt.shape[1] :]
    rows = {k: v.repeat_interleave(2, 0) for k, v in generation_batch.items() if k not in ("pixel_values",)}
    batch = {**rows, "pixel_values": generation_batch["pixel_values"]}
    batch["image_grid_thw"] = generation_batch["image_grid_thw"].repeat_interleave(2, 0)
    batch["pixel_values"] = torch.cat(
        [
            chunk
            for chunk in generation_batch["pixel_values"].split(generation_batch["image_grid_thw"].prod(-1).tolist())
            for _ in range(2)
        ]
    )
    logits = reference_compressed_logits(model, batch, new_tokens)
    # Beam search scores with the log-softmax over the whole vocabulary (suppressing chorus ids comes after it).
    log_probs = logits.float().log_softmax(-1).gather(2, new_tokens[..., None])[..., 0]
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos])
    # Tokens after a beam's end-of-sequence are padding: not scored.
    ended = torch.isin(new_tokens, eos).long().cumsum(1)
    scored = (ended == 0) | (torch.isin(new_tokens, eos) & (ended == 1))
    expected = (log_probs * scored).sum(1)
    assert torch.allclose(out.sequences_scores, expected, atol=1e-4)


# ---------------------------------------------------------------- embeddings


def test_embedding_is_unit_norm_mean_chorus_state(model, processor, images):
    batch = processor.process_embedding_inputs(images=images, texts=["a cat", None])
    embedding = model.get_embedding(**batch)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(2), atol=1e-6)
    # Pooled from the decoder's final norm, read deliberately from its output (on Qwen3-VL, transformers'
    # `hidden_states[-1]` is taken before that norm).
    normed = []
    hook = model.model.language_model.norm.register_forward_hook(lambda module, args, out: normed.append(out))
    try:
        with torch.no_grad():
            model._backbone_class.forward(model, **batch, output_hidden_states=True)
    finally:
        hook.remove()
    chorus = torch.isin(batch["input_ids"], torch.tensor(model.config.chorus_token_ids))
    states = normed[0][chorus].view(2, model.config.num_chorus_tokens, -1).mean(1)
    assert torch.allclose(embedding, torch.nn.functional.normalize(states, dim=-1), atol=1e-6)


def test_embedding_is_independent_of_batch_and_padding(model, processor):
    images = [random_image(56, 56, 5), random_image(112, 84, 6), None, random_image(84, 112, 7)]
    texts = [None, "a red dog on a very long and winding road", "only text here", "a cat"]
    batch = processor.process_embedding_inputs(images=images, texts=texts)
    with torch.no_grad():
        together = model.get_embedding(**batch)
        for i, (image, text) in enumerate(zip(images, texts, strict=True)):
            alone = model.get_embedding(**processor.process_embedding_inputs(images=[image], texts=[text]))
            assert (alone[0] - together[i]).abs().max() <= 1e-5


def test_embedding_ignores_tokens_after_the_chorus_and_skips_lm_head(model, processor, images):
    embedding_inputs = processor.process_embedding_inputs(images=images[:1], texts=["a cat"])
    generation_inputs = processor.process_generation_inputs(
        questions=["A long question?"], images=images[:1], texts=["a cat"]
    )
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            a = model.get_embedding(**embedding_inputs)
            b = model.get_embedding(**generation_inputs)
    finally:
        hook.remove()
    assert calls == []
    assert (a - b).abs().max() <= 1e-6


def test_forward_returns_embeddings_and_sparse_lm_loss(model, processor, images):
    batch = processor.process_generation_inputs(
        questions=["What is it?", "And this?"], images=images, answers=["a cat", "two"]
    )
    with torch.no_grad():
        out = model(**batch, compress=torch.tensor([True, False]), return_embeddings=True, supervised_logits_only=True)
        reference = model.get_embedding(**{k: v for k, v in batch.items() if k != "labels"})
        compressed = model(**batch, compress=True)
        native = model(**batch, compress=False)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert out.supervised_logits.shape == (supervised, model.config.text_config.vocab_size)
    assert out.logits is None
    assert torch.allclose(out.embeddings, reference, atol=1e-6)
    # A mixed batch is the compressed row's loss and the native row's loss combined.
    assert not torch.allclose(compressed.loss, native.loss)
    full = model._backbone_class.forward(model, **{k: v for k, v in batch.items() if k != "labels"})
    labels = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(full.logits[:, :-1][labels != -100], labels[labels != -100])
    assert torch.allclose(native.loss, expected, atol=1e-5)


# ---------------------------------------------------------------- bad input


def test_missing_chorus_block_is_refused(model, processor, backbone, images):
    from crem_hf.testing import make_tiny_qwen2vl_processor

    plain = make_tiny_qwen2vl_processor(processor.tokenizer, backbone=backbone)
    text = plain.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], tokenize=False
    )
    batch = plain(images=images[:1], text=[text], return_tensors="pt")
    with pytest.raises(ValueError, match="chorus"):
        model.get_embedding(**batch)
    with pytest.raises(ValueError, match="chorus"):
        model.generate(**batch, compress=True, max_new_tokens=2)


def test_embedding_input_cannot_be_compressed_generation_input(model, processor, images):
    batch = processor.process_embedding_inputs(images=images[:1])
    with pytest.raises(ValueError, match="generation prompt after the chorus"):
        model.generate(**batch, compress=True, max_new_tokens=2)


def test_image_token_mismatch_is_refused(model, processor, images):
    batch = processor.process_embedding_inputs(images=images)
    with pytest.raises(ValueError, match="image tokens"):
        model.get_embedding(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"][:16],
            image_grid_thw=batch["image_grid_thw"][:1],
        )
    with pytest.raises(ValueError, match="no pixel_values"):
        model.get_embedding(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_compress_once_answer_many_equals_compressed_generation(model, processor, images):
    questions = ["What is in the image?", "Which digit is shown? Answer in one word, please."]
    context = model.compress(**processor.process_embedding_inputs(images=images[1:]))
    assert context.cache.get_seq_length() == context.input_ids.shape[1]
    followups = processor.process_followups(questions=questions)
    options = {"max_new_tokens": 6, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    out = model.generate(context=context, **followups, **options)
    answers, logits = out.sequences, torch.stack(out.logits, 1)
    assert torch.equal(answers[:, : followups["input_ids"].shape[1]], followups["input_ids"])
    for row, question in enumerate(questions):
        batch = processor.process_generation_inputs(questions=[question], images=images[1:])
        full = model.generate(**batch, compress=True, **options)
        new_tokens = full.sequences[0, batch["input_ids"].shape[1] :]
        assert torch.equal(answers[row, followups["input_ids"].shape[1] :], new_tokens)
        assert (logits[row] - torch.stack(full.logits, 1)[0]).abs().max() < 1e-4
    again = model.generate(context=context, **followups, max_new_tokens=6, do_sample=False)
    assert torch.equal(again, answers), "the context is reusable"
    two_contexts = model.compress(**processor.process_embedding_inputs(images=images))
    with pytest.raises(ValueError, match="context of batch 2"):
        model.generate(context=two_contexts, input_ids=followups["input_ids"][:1].repeat(3, 1), max_new_tokens=2)


def test_a_context_continues_and_expands_as_the_compressed_prompts_would(model, processor, images):
    """
    The oracle is `compress` of the prompts themselves: `continued(followup)` holds the generation prompt's kept slots
    at their positions, and the follow-up run over its cache gives that prompt's keys and values, leaving the context
    as it was; `expand(n)` is the context of each prompt repeated `n` times in a row.
    """
    question = "Which digit is shown?"
    context = model.compress(**processor.process_embedding_inputs(images=images[1:]))
    followup = processor.process_followups(questions=[question])
    continued = context.continued(followup["input_ids"], followup["attention_mask"])
    oracle = model.compress(**processor.process_generation_inputs(questions=[question], images=images[1:]))
    for field in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(getattr(continued, field), getattr(oracle, field)), field
    seen = context.input_ids.shape[1]
    assert continued.cache.get_seq_length() == seen, "the follow-up is generate's to run"
    with torch.no_grad():
        model(
            input_ids=followup["input_ids"],
            attention_mask=continued.attention_mask,
            position_ids=continued.position_ids[..., seen:],
            cache=continued.cache,
        )
    for ours, theirs in zip(continued.cache.layers, oracle.cache.layers, strict=True):
        assert (ours.keys - theirs.keys).abs().max() <= 1e-5 and (ours.values - theirs.values).abs().max() <= 1e-5
    assert context.cache.get_seq_length() == seen, "the context is left as it was"

    texts = ["a cat", None]
    expanded = model.compress(**processor.process_embedding_inputs(images=images, texts=texts), return_embeddings=True)
    expanded = expanded.expand(3)
    repeated = [item for item in zip(images, texts, strict=True) for _ in range(3)]
    oracle = model.compress(
        **processor.process_embedding_inputs(images=[i for i, _ in repeated], texts=[t for _, t in repeated]),
        return_embeddings=True,
    )
    for field in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(getattr(expanded, field), getattr(oracle, field)), field
    assert (expanded.embeddings - oracle.embeddings).abs().max() <= 1e-5
    for ours, theirs in zip(expanded.cache.layers, oracle.cache.layers, strict=True):
        assert (ours.keys - theirs.keys).abs().max() <= 1e-5 and (ours.values - theirs.values).abs().max() <= 1e-5
    unfinished = model.compress(
        **processor.process_generation_inputs(questions=[question], images=images[1:]), prefill_last=False
    )
    with pytest.raises(ValueError, match="fully prefilled"):
        unfinished.continued(followup["input_ids"])
    with pytest.raises(ValueError, match=r"batch 6 continues with follow-up ids \(6, length\)"):
        expanded.continued(followup["input_ids"])


def test_max_length_counts_the_prompt_passed_in_every_mode(model, processor, images, generation_batch):
    """`max_length` counts the caller's prompt (compress=True) or the follow-up turns (context=), as natively."""
    greedy = {"do_sample": False}
    prompt = generation_batch["input_ids"].shape[1]
    by_count = model.generate(**generation_batch, compress=True, max_new_tokens=3, **greedy)
    assert by_count.shape[1] == prompt + 3
    assert torch.equal(model.generate(**generation_batch, compress=True, max_length=prompt + 3, **greedy), by_count)
    config = GenerationConfig(max_length=prompt + 3, do_sample=False)
    rest = {key: value for key, value in generation_batch.items() if key != "input_ids"}
    assert torch.equal(model.generate(generation_batch["input_ids"], config, **rest, compress=True), by_count)
    context = model.compress(**processor.process_embedding_inputs(images=images[1:]))
    followups = processor.process_followups(questions=["What is in the image?", "Which digit is shown?"])
    length = followups["input_ids"].shape[1]
    by_count = model.generate(context=context, **followups, max_new_tokens=3, **greedy)
    assert by_count.shape[1] == length + 3
    assert torch.equal(model.generate(context=context, **followups, max_length=length + 3, **greedy), by_count)
    with pytest.raises(ValueError, match=f"max_length={prompt} leaves no room"):
        model.generate(**generation_batch, compress=True, max_length=prompt)


def test_min_length_counts_the_prompt_passed_with_compression(model, generation_batch):
    """`min_length` counts the caller's prompt as `max_length` does, so it equals `min_new_tokens` of the rest."""
    greedy = {"do_sample": False, "max_new_tokens": 8}
    prompt = generation_batch["input_ids"].shape[1]
    free = model.generate(**generation_batch, compress=True, **greedy)[0, prompt:].tolist()
    # An end token the first row first reaches at step 3 or later: with 3 new tokens at least, it stops right there.
    step = next((i for i in range(3, len(free)) if free[i] not in free[:i]), None)
    assert step is not None, f"the first row's answer {free} repeats itself: no end token to test with"
    ended = model.generate(**generation_batch, compress=True, eos_token_id=free[step], min_new_tokens=3, **greedy)
    assert ended[0, prompt : prompt + step + 1].tolist() == free[: step + 1]
    by_length = model.generate(
        **generation_batch, compress=True, eos_token_id=free[step], min_length=prompt + 3, **greedy
    )
    assert torch.equal(by_length, ended)
