"""Compression as pruning (causal prefill, prune, continue) against its oracle: one no-cache forward of the inner
backbone model under the dense compression mask (`helpers.dense_compression_mask`), on every backbone (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL: each module-scoped fixture is built per backbone). Logits, greedy tokens and
gradients agree for aligned and unaligned batches, mixed compressed/uncompressed rows, left (and right) padding,
several image sizes, several answers per row, with sdpa, eager and a kernel that takes nothing but a 2-D padding mask
(flash-attention's contract); no 4-D mask reaches the decoder."""

from __future__ import annotations

import backbones
import pytest
import torch
import torch.nn.functional as F
from helpers import dense_compression_mask, dense_oracle_states, greedy_with_logits, random_image, randomize_lora_b
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from crem_hf.loading import merge_adapter
from crem_hf.modeling_crem import ChorusCompression
from crem_hf.testing import make_tiny_crem
from crem_hf.training import apply_lora

LOGITS_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-5  # relative, per parameter tensor

# The per-backbone fixtures (they override the session's Qwen2-VL ones here): each test runs on every backbone.
backbone = backbones.backbone
processor = backbones.processor


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny(request, processor, backbone):
    """A LoRA-free tiny CREM model of each masked attention kernel, in training mode (dropout is 0)."""
    return make_tiny_crem(processor, seed=0, backbone=backbone, attn_implementation=request.param).train()


def images_of(*sizes: tuple[int, int]) -> list:
    return [random_image(height, width, seed=i) for i, (height, width) in enumerate(sizes)]


def batch_of(processor, kind: str) -> dict:
    """
    Labelled batches (labels on the answers): `aligned` (every chorus block ends at the same column), `unaligned`
    (different tails, so different chorus ends and left padding), `chat` (three rows, two answers each, images of
    three sizes).
    """
    if kind == "aligned":
        batch = processor.process_generation_inputs(
            questions=["What is shown?"] * 2,
            images=images_of((56, 84), (112, 112)),
            texts=["a cat", None],
            answers=["a cat"] * 2,
        )
    elif kind == "unaligned":
        batch = processor.process_generation_inputs(
            questions=["What is shown?", "Which digit is shown? Answer in one word, please."],
            images=images_of((56, 84), (112, 112)),
            texts=["a cat", None],
            answers=["a small cat", "seven"],
        )
    else:
        images = images_of((32, 56), (56, 84), (112, 112))
        turns = [
            ("Colour?", "red", "Sure?", "yes, red"),
            ("What is it?", "a dog", "Why?", "it barks"),
            ("Hm?", "x", "y", "z"),
        ]
        conversations = [
            [
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q1}]},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": q2},
                {"role": "assistant", "content": a2},
            ]
            for image, (q1, a1, q2, a2) in zip(images, turns, strict=True)
        ]
        batch = processor.process_chat(conversations=conversations, return_labels=True)
    return dict(batch)


FLAGS = {"all": lambda n: torch.ones(n, dtype=torch.bool), "first": lambda n: torch.arange(n) == 0}
FLAGS["last"] = lambda n: torch.arange(n) == n - 1


def oracle_logits(model, batch, flags) -> torch.Tensor:
    return model.lm_head(dense_oracle_states(model, batch, flags))


def oracle_loss(model, batch, flags) -> torch.Tensor:
    """The LM loss under the dense mask: mean cross-entropy over the labelled next tokens."""
    hidden = dense_oracle_states(model, batch, flags)
    targets = batch["labels"][:, 1:]
    supervised = targets != -100
    return F.cross_entropy(model.lm_head(hidden[:, :-1][supervised]).float(), targets[supervised])


def without(batch: dict, *keys: str) -> dict:
    return {k: v for k, v in batch.items() if k not in keys}


# ---------------------------------------------------------------- forward: logits and loss


@pytest.mark.parametrize("kind", ["aligned", "unaligned", "chat"])
@pytest.mark.parametrize("flags", list(FLAGS))
def test_compressed_forward_equals_the_dense_oracle(tiny, processor, kind, flags):
    batch = batch_of(processor, kind)
    compress = FLAGS[flags](batch["input_ids"].shape[0])
    rows = ChorusCompression.align(
        tiny.chorus_layout(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"], compress
    )
    assert rows.identity == (kind == "aligned"), "aligned batches run in place, the others are re-packed"
    assert (batch["attention_mask"] == 0).any(), "the batch must exercise left padding"
    with torch.no_grad():
        ours = tiny(**batch, compress=compress)
        reference = oracle_logits(tiny, batch, compress)
        native = oracle_logits(tiny, batch, False)
        reference_loss = oracle_loss(tiny, batch, compress)
    real = batch["attention_mask"].bool()
    assert ours.logits.shape == reference.shape
    assert (ours.logits - reference)[real].abs().max() <= LOGITS_TOLERANCE
    # The oracle's compression matters here: compressed rows' tails differ from native attention.
    after = (
        torch.arange(real.shape[1])
        >= tiny.chorus_layout(batch["input_ids"], batch["attention_mask"]).chorus_end[:, None]
    )
    assert (reference - native)[compress[:, None] & after & real].abs().max() > 1e-3
    assert float(ours.loss) == pytest.approx(float(reference_loss), abs=1e-5)


def test_compressed_hidden_states_equal_the_dense_oracle(tiny, processor):
    batch = batch_of(processor, "chat")
    compress = FLAGS["last"](3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ours = tiny(**batch, compress=compress, output_hidden_states=True, return_embeddings=True)
        theirs = tiny.model(
            **without(batch, "labels", "attention_mask", "mm_token_type_ids"),
            attention_mask=dense_compression_mask(tiny, ids, mask, compress),
            position_ids=tiny.compute_position_ids(ids, mask, batch["image_grid_thw"]),
            output_hidden_states=True,
        )
    assert len(ours.hidden_states) == len(theirs.hidden_states) == tiny.config.text_config.num_hidden_layers + 1
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert (a - b)[mask.bool()].abs().max() <= 1e-5
    assert ours.cache is None and ours.attentions is None
    assert torch.allclose(ours.embeddings, tiny.get_embedding(**without(batch, "labels")), atol=1e-6)


def test_any_padding_gives_the_same_states(tiny, processor):
    """Right padding (and left) is re-packed the same way: each real token's logits do not depend on it."""
    batch = batch_of(processor, "unaligned")
    mask = batch["attention_mask"]
    right = {key: batch[key].clone() for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids")}
    for row in range(mask.shape[0]):
        pad = int((mask[row] == 0).sum())
        for key in right:
            right[key][row] = batch[key][row].roll(-pad)
    assert not right["attention_mask"][:, -1].all(), "the copy must be right padded"
    compress = torch.tensor([True, False])
    with torch.no_grad():
        left_out = tiny(**batch, compress=compress)
        right_out = tiny(**{**batch, **right}, compress=compress)
    assert (left_out.logits[mask.bool()] - right_out.logits[right["attention_mask"].bool()]).abs().max() <= 1e-5
    assert torch.allclose(left_out.loss, right_out.loss, atol=1e-6)


# ---------------------------------------------------------------- gradients


def gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, reference in theirs.items():
        error = (ours[name] - reference).norm()
        assert error <= GRADIENT_TOLERANCE * max(float(reference.norm()), 1e-6), name


@pytest.mark.parametrize("kind", ["aligned", "unaligned", "chat"])
def test_compressed_gradients_equal_the_dense_oracle(tiny, processor, kind):
    """Gradients of every parameter, the vision tower's included: they reach phase 1 through the kept keys/values."""
    batch = batch_of(processor, kind)
    rows = batch["input_ids"].shape[0]
    for compress in (torch.ones(rows, dtype=torch.bool), FLAGS["first"](rows)):
        # The trainer's call: sparse logits at the labelled positions.
        ours = gradients(tiny, tiny(**batch, compress=compress, supervised_logits_only=True).loss)
        theirs = gradients(tiny, oracle_loss(tiny, batch, compress))
        assert_same_gradients(ours, theirs)
        # With every row compressed, the image reaches the answers only through the chorus block's keys and values.
        visual = [grad for name, grad in ours.items() if "visual" in name]
        assert visual and max(float(grad.abs().max()) for grad in visual) > 0


def test_lora_training_gradients_equal_the_dense_oracle(processor, backbone):
    """
    The main job's training path: peft LoRA plus the trainable chorus rows (`apply_lora`), whose head is tied to the
    embeddings on Qwen2.5-VL and Qwen3-VL (peft wraps `lm_head` with the same rows). The compressed LM loss and the
    gradient of every trainable tensor, chorus rows included, equal the dense-mask oracle's through the same modules;
    the merged model's head and embeddings hold the trained rows.
    """
    crem = make_tiny_crem(processor, seed=0, backbone=backbone)
    model = randomize_lora_b(apply_lora(crem, dropout=0.0)).train()
    chorus = torch.tensor(processor.chorus_token_ids)
    with torch.no_grad():
        rows = next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n)
        rows.add_(0.1 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(0)))
    batch = batch_of(processor, "unaligned")
    compress = FLAGS["first"](batch["input_ids"].shape[0])
    ours = gradients(model, model(**batch, compress=compress, supervised_logits_only=True).loss)
    theirs = gradients(model, oracle_loss(crem, batch, compress))
    assert any("trainable_tokens_delta" in name for name in ours) and any("lora_B" in name for name in ours)
    assert_same_gradients(ours, theirs)
    merged = merge_adapter(model)
    assert torch.equal(merged.get_input_embeddings().weight[chorus], rows.detach())
    if merged.config.tie_word_embeddings:
        assert merged.lm_head.weight is merged.get_input_embeddings().weight


def test_gradient_checkpointing_keeps_the_gradients(processor, backbone):
    model = make_tiny_crem(processor, seed=0, backbone=backbone).train()
    batch = batch_of(processor, "unaligned")
    compress = torch.tensor([True, False])
    plain = gradients(model, model(**batch, compress=compress, supervised_logits_only=True).loss)
    model.gradient_checkpointing_enable()  # transformers' default: non-reentrant
    checkpointed = gradients(model, model(**batch, compress=compress, supervised_logits_only=True).loss)
    assert_same_gradients(checkpointed, plain)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        model(**batch, compress=compress, supervised_logits_only=True)


# ---------------------------------------------------------------- generation


def generation_batch_of(processor) -> dict:
    """Three rows: images of three sizes, questions of three lengths, so chorus ends differ and rows are left padded."""
    return dict(
        processor.process_generation_inputs(
            questions=["What is it?", "Which digit is shown? Answer in one word, please.", "Why?"],
            images=images_of((32, 56), (56, 84), (112, 112)),
            texts=["a cat", None, "a long description of a very small picture"],
        )
    )


def assert_generation_matches_the_oracle(model, oracle, batch, compress, **options) -> None:
    sequences, logits = greedy_with_logits(model, batch, 5, compress=compress, **options)
    prompt = batch["input_ids"]
    new_tokens = sequences[:, prompt.shape[1] :]
    full = {
        **batch,
        "input_ids": sequences,
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(new_tokens)], 1),
        "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], torch.zeros_like(new_tokens)], 1),
    }
    with torch.no_grad():
        reference = oracle_logits(oracle, full, compress)[:, prompt.shape[1] - 1 : -1]
    assert (logits - reference).abs().max() <= LOGITS_TOLERANCE
    reference[..., oracle.config.chorus_token_ids] = float("-inf")
    assert torch.equal(reference.argmax(-1), new_tokens)


@pytest.mark.parametrize("flags", list(FLAGS))
def test_compressed_generation_equals_the_dense_oracle(tiny, processor, flags):
    batch = generation_batch_of(processor)
    layout = tiny.chorus_layout(batch["input_ids"], batch["attention_mask"])
    assert len(set(layout.chorus_end.tolist())) == 3
    assert_generation_matches_the_oracle(tiny.eval(), tiny, batch, FLAGS[flags](3))
    tiny.train()


# ---------------------------------------------------------------- any kernel that takes a 2-D padding mask


def padding_mask_only_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """
    Attention as flash-attention computes it from a 2-D padding mask: per row, unpad the keys (mask) and the queries
    (the mask's last `query_length` columns), causal from the bottom right. Anything but a 2-D mask fails.
    """
    assert attention_mask is None or attention_mask.ndim == 2, "this kernel takes a 2-D padding mask only"
    batch, heads, queries, _ = query.shape
    keys = key.shape[2]
    key = key.repeat_interleave(heads // key.shape[1], 1)
    value = value.repeat_interleave(heads // value.shape[1], 1)
    mask = attention_mask.bool() if attention_mask is not None else torch.ones(batch, keys, dtype=torch.bool)
    out = query.new_zeros(batch, queries, heads, query.shape[-1])
    for row in range(batch):
        k_index = mask[row, -keys:].nonzero().flatten()
        q_index = mask[row, -queries:].nonzero().flatten()
        scores = query[row][:, q_index] @ key[row][:, k_index].transpose(-1, -2) * scaling
        allowed = torch.arange(len(k_index))[None] <= torch.arange(len(q_index))[:, None] + len(k_index) - len(q_index)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[row, q_index] = (weights @ value[row][:, k_index]).transpose(0, 1)
    return out, None


@pytest.fixture(scope="module")
def padding_only(processor, backbone):
    """A tiny model whose decoder attends with `padding_mask_only_attention`, and an sdpa twin with its weights."""
    AttentionInterface.register("padding_mask_only", padding_mask_only_attention)
    AttentionMaskInterface.register("padding_mask_only", flash_attention_mask)
    model = make_tiny_crem(processor, seed=0, backbone=backbone).eval()
    model.config.text_config._attn_implementation = "padding_mask_only"
    return model, make_tiny_crem(processor, seed=0, backbone=backbone).eval()


def test_compression_runs_on_a_padding_mask_only_kernel(padding_only, processor):
    model, oracle = padding_only
    batch = batch_of(processor, "chat")
    compress = FLAGS["first"](3)
    with torch.no_grad():
        ours = model(**batch, compress=compress)
        reference = oracle_logits(oracle, batch, compress)
    real = batch["attention_mask"].bool()
    assert (ours.logits - reference)[real].abs().max() <= LOGITS_TOLERANCE
    assert_generation_matches_the_oracle(model, oracle, generation_batch_of(processor), compress)
    with pytest.raises(AssertionError, match="2-D padding mask only"):
        with torch.no_grad():  # the old mechanism's dense mask cannot run on it
            dense_oracle_states(model, batch, compress)


def test_no_4d_mask_reaches_the_decoder(processor, backbone, images):
    model = make_tiny_crem(processor, seed=0, backbone=backbone)
    masks = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        batch = batch_of(processor, "chat")
        model(**batch, compress=FLAGS["first"](3), supervised_logits_only=True).loss.backward()
        with torch.no_grad():
            model(**batch, compress=True)
            model.generate(**generation_batch_of(processor), compress=True, max_new_tokens=2)
            context = model.compress(**processor.process_embedding_inputs(images=images))
            model.generate(
                context=context, **processor.process_followups(questions=["Why?", "What?"]), max_new_tokens=2
            )
    finally:
        hook.remove()
    assert len(masks) > 10
    assert all(mask is None or mask.ndim == 2 for mask in masks)


def test_compressed_forward_refuses_what_it_cannot_return(tiny, processor):
    batch = batch_of(processor, "aligned")
    with pytest.raises(ValueError, match="no cache"):
        tiny(**batch, compress=True, use_cache=True)
    with pytest.raises(ValueError, match="no attention weights"):
        tiny(**batch, compress=True, output_attentions=True)
