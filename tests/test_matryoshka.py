"""Matryoshka embeddings: `get_embedding(dim=...)` against a hand-pooled oracle, its refusals, the config field, the
loss over prefixes (closed form) and training with `--matryoshka_dims`; on every backbone where a model is used."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import backbones
import pytest
import torch
import torch.nn.functional as F
from helpers import random_image, write_colour_data

from crem_hf.configuration_crem import CREMConfig, check_matryoshka_dims
from crem_hf.loading import ADAPTER_CREM_SETTINGS, load_crem
from crem_hf.testing import make_tiny_crem, make_tiny_qwen2vl, make_tiny_qwen2vl_processor

backbone = backbones.backbone
processor = backbones.processor

HIDDEN = 64  # the tiny models' hidden size
DIMS = [16, 32, HIDDEN]


@pytest.fixture(scope="module")
def model(processor, backbone):
    """A tiny model whose config says it was trained for 16, 32 and the full 64."""
    model = make_tiny_crem(processor, seed=0, backbone=backbone).eval()
    model.config.matryoshka_dims = [16, 32, "full"]
    model.config.matryoshka_dims = check_matryoshka_dims(model.config.matryoshka_dims, HIDDEN)
    return model


def unnormalised_chorus_mean(model, batch) -> torch.Tensor:
    """`(batch, hidden)`: the mean chorus state read off the decoder's final norm (the oracle, pooled by hand)."""
    normed = []
    hook = model.model.language_model.norm.register_forward_hook(lambda module, args, out: normed.append(out))
    try:
        with torch.no_grad():
            model._backbone_class.forward(model, **batch)
    finally:
        hook.remove()
    chorus = torch.isin(batch["input_ids"], torch.tensor(model.config.chorus_token_ids))
    return normed[0][chorus].view(batch["input_ids"].shape[0], model.config.num_chorus_tokens, -1).mean(1)


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("dim", [16, 32, HIDDEN, None])
def test_get_embedding_at_a_dim_is_the_normalised_prefix_of_the_chorus_mean(model, processor, dim):
    images = [random_image(56, 84, 1), None, random_image(112, 112, 2)]
    batch = processor.process_embedding_inputs(images=images, texts=["a cat", "only text", None])
    with torch.no_grad():
        embedding = model.get_embedding(**batch, dim=dim)
    mean = unnormalised_chorus_mean(model, batch)
    expected = F.normalize(mean[:, : dim or HIDDEN], dim=-1)
    assert embedding.shape == (3, dim or HIDDEN)
    assert torch.allclose(embedding, expected, atol=1e-6)
    if dim is not None and dim < HIDDEN:
        # Not the prefix of the unit full vector (that one is shorter than 1).
        assert not torch.allclose(embedding, model.get_embedding(**batch)[:, :dim], atol=1e-3)


def test_embedding_at_a_dim_is_independent_of_batch_and_padding(model, processor):
    images = [random_image(56, 56, 5), random_image(112, 84, 6), None, random_image(84, 112, 7)]
    texts = [None, "a red dog on a very long and winding road", "only text here", "a cat"]
    with torch.no_grad():
        together = model.get_embedding(**processor.process_embedding_inputs(images=images, texts=texts), dim=16)
        for i, (image, text) in enumerate(zip(images, texts, strict=True)):
            alone = model.get_embedding(**processor.process_embedding_inputs(images=[image], texts=[text]), dim=16)
            assert (alone[0] - together[i]).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("dim", "message"),
    [
        (24, r"dim 24 is not an embedding size this model was trained for \(trained for \[16, 32, 64\]"),
        (65, "dim 65 is larger than the hidden size 64"),
        (0, "dim must be a positive integer"),
        (-16, "dim must be a positive integer"),
        ("16", "dim must be a positive integer"),
        (True, "dim must be a positive integer"),
    ],
)
def test_a_dim_the_model_was_not_trained_for_is_refused_by_name(model, processor, dim, message):
    batch = processor.process_embedding_inputs(texts=["a cat"])
    with pytest.raises(ValueError, match=message):
        model.get_embedding(**batch, dim=dim)


def test_without_trained_dims_only_the_full_embedding_is_allowed(processor, backbone):
    plain = make_tiny_crem(processor, seed=0, backbone=backbone).eval()
    assert plain.config.matryoshka_dims is None
    batch = processor.process_embedding_inputs(texts=["a cat"])
    with torch.no_grad():
        assert plain.get_embedding(**batch, dim=HIDDEN).equal(plain.get_embedding(**batch))
    with pytest.raises(ValueError, match="dim 16 is not an embedding size.*not trained with Matryoshka dims"):
        plain.get_embedding(**batch, dim=16)


# ---------------------------------------------------------------- the config field


def test_config_records_the_trained_dims_and_round_trips(tmp_path, model):
    model.config.save_pretrained(tmp_path)
    loaded = type(model.config).from_pretrained(tmp_path)
    assert loaded.matryoshka_dims == DIMS
    assert '"matryoshka_dims": [\n    16,\n    32,\n    64\n  ]' in (tmp_path / "config.json").read_text()
    assert CREMConfig().matryoshka_dims is None


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        ([16, 8], "matryoshka_dims: dims must be strictly increasing, got 8 after 16"),
        ([16, 16], "matryoshka_dims: dims must be strictly increasing, got 16 after 16"),
        ([0, 16], "matryoshka_dims: dim 0 must be > 0"),
        ([16, 9000], "matryoshka_dims: dim 9000 is larger than the hidden size 8192"),
        (["full", 16], "matryoshka_dims: 'full' .* must be the last dim"),
        ([16, "half"], "matryoshka_dims: dim 'half' is not a positive integer"),
        ([16, 2.5], "matryoshka_dims: dim 2.5 is not a positive integer"),
        ([], "matryoshka_dims must name at least one dim"),
        (16, "matryoshka_dims must be a list of dims"),
    ],
)
def test_bad_dims_in_the_config_are_refused_by_name(dims, message):
    with pytest.raises(ValueError, match=message):
        CREMConfig(matryoshka_dims=dims)


def test_full_in_the_config_is_the_hidden_size():
    assert CREMConfig(matryoshka_dims=["64", 512, "full"]).matryoshka_dims == [64, 512, 8192]


# ---------------------------------------------------------------- training as a command

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_lora.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def train_lora(tmp_path, *options: str) -> tuple[subprocess.CompletedProcess, str]:
    data = write_colour_data(tmp_path / "data", copies=1)
    base = tmp_path / "qwen2vl-tiny"
    if not base.exists():
        plain = make_tiny_qwen2vl_processor()
        make_tiny_qwen2vl(plain.tokenizer, seed=0).save_pretrained(base)
        plain.save_pretrained(base)
    out = tmp_path / "out"
    command = [
        sys.executable, SCRIPT, "--model", str(base), "--output_dir", str(out),
        "--retrieval_data", data["retrieval"], "--retrieval_image_root", data["image_root"],
        "--min_image_tokens", "4", "--max_image_tokens", "16",
        "--retrieval_batch_size", "4", "--gradient_cache_chunk_size", "2",
        "--max_steps", "2", "--save_steps", "1", "--logging_steps", "1", "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", *options,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV), str(out)


@pytest.mark.slow
def test_train_lora_with_matryoshka_dims_records_them_and_the_model_embeds_at_them(tmp_path):
    result, out = train_lora(tmp_path, "--matryoshka_dims", "16", "32", "full")
    assert result.returncode == 0, result.stderr[-4000:]
    for folder in (out, os.path.join(out, "checkpoint-1")):
        with open(os.path.join(folder, ADAPTER_CREM_SETTINGS)) as handle:
            assert json.load(handle) == {"matryoshka_dims": DIMS}
    with open(os.path.join(out, "run_summary.json")) as handle:
        logged = [entry for entry in json.load(handle)["log_history"] if "contrastive_loss" in entry]
    assert len(logged) == 2 and all(f"contrastive_loss_d{d}" in entry for entry in logged for d in DIMS)
    model, processor = load_crem(out)
    assert model.config.matryoshka_dims == DIMS
    batch = processor.process_embedding_inputs(images=[random_image(56, 84, 1)], texts=["a cat"])
    with torch.no_grad():
        at_16, full = model.get_embedding(**batch, dim=16), model.get_embedding(**batch)
    assert torch.allclose(at_16, F.normalize(full[:, :16], dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match=r"dim 24 is not an embedding size .*trained for \[16, 32, 64\]"):
        model.get_embedding(**batch, dim=24)
    # The merged export carries them in config.json.
    model.save_pretrained(tmp_path / "merged")
    assert CREMConfig.from_pretrained(tmp_path / "merged").matryoshka_dims == DIMS


@pytest.mark.slow
def test_train_lora_refuses_bad_matryoshka_dims_by_name_and_writes_nothing(tmp_path):
    result, out = train_lora(tmp_path, "--matryoshka_dims", "32", "16")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "examples/train_lora.py: error: matryoshka_dims: dims must be strictly increasing, got 16 after 32 in "
        "['32', '16']."
    ]
    assert not os.path.exists(out)
    # Larger than the model's hidden size: known once the model is loaded, before any step or file.
    result, out = train_lora(tmp_path, "--matryoshka_dims", "16", "128")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "examples/train_lora.py: error: --matryoshka_dims: dim 128 is larger than the hidden size 64.", last
    assert not os.path.exists(os.path.join(out, "adapter_model.safetensors"))


# ---------------------------------------------------------------- sentence-transformers, mteb, crem-eval


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A Hub folder (crem-export's) of a Qwen2-VL tiny model trained for 16, 32 and 64."""
    from crem_hf.hub import CardInfo, export_hub_folder
    from crem_hf.testing import make_tiny_processor

    processor = make_tiny_processor()
    model = make_tiny_crem(processor, seed=4).eval()
    model.config.matryoshka_dims = check_matryoshka_dims([16, 32, "full"], HIDDEN)
    folder = tmp_path_factory.mktemp("hub") / "crem-matryoshka"
    export_hub_folder(model, processor, folder, CardInfo(repo_id="org/crem-matryoshka"))
    return folder, model, processor


def test_sentence_transformers_truncate_dim_and_dim_give_get_embedding_at_the_dim(exported):
    from sentence_transformers import SentenceTransformer

    from crem_hf import encode

    folder, model, processor = exported
    image = random_image(56, 84, 3)
    inputs = ["a cat", image, {"text": "a dog", "image": image}]
    with torch.no_grad():
        reference = torch.cat(
            [
                model.get_embedding(**processor.process_embedding_inputs(texts=["a cat"]), dim=16),
                model.get_embedding(**processor.process_embedding_inputs(images=[image]), dim=16),
                model.get_embedding(**processor.process_embedding_inputs(images=[image], texts=["a dog"]), dim=16),
            ]
        )
    # The package's own encoder takes the same inputs as lists (a pair is an image and a text of one sample).
    ours = encode(model, processor, images=[None, image, image], texts=["a cat", None, "a dog"], dim=16)
    assert (ours - reference).abs().max() <= 1e-5
    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    # encode(dim=): the model's own truncation, unit vectors.
    by_dim = st.encode(inputs, convert_to_tensor=True, dim=16)
    assert (by_dim - reference).abs().max() <= 1e-5
    # Sentence Transformers' truncate_dim cuts the unit full vector: normalised again, it is the same vector, and
    # its cosine scores equal the Matryoshka embedding's either way.
    truncating = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu", truncate_dim=16)
    assert truncating.get_sentence_embedding_dimension() == 16
    normalised = truncating.encode(inputs, convert_to_tensor=True, normalize_embeddings=True)
    assert (normalised - reference).abs().max() <= 1e-5
    raw = truncating.encode(inputs, convert_to_tensor=True)
    assert raw.shape == (3, 16) and not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    assert (truncating.similarity(raw, raw) - reference @ reference.T).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="dim 24 is not an embedding size this model was trained for"):
        st.encode(inputs, dim=24)


def test_encode_and_the_mteb_encoder_take_a_dim(exported):
    import mteb
    from mteb.types import PromptType

    from crem_hf import encode
    from crem_hf.integrations.mteb import CREMEncoder

    _, model, processor = exported
    images = [random_image(28 * (1 + i % 3), 56, seed=i) for i in range(5)]
    texts = ["zero", None, "two", "three", None]
    full = encode(model, processor, images=images, texts=texts, instruction="Find it.", batch_size=2)
    at_32 = encode(model, processor, images=images, texts=texts, instruction="Find it.", batch_size=2, dim=32)
    assert at_32.shape == (5, 32)
    assert torch.allclose(at_32, F.normalize(full[:, :32], dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="dim 8 is not an embedding size"):
        encode(model, processor, texts=[], dim=8)  # checked before any batch, even with nothing to encode

    encoder = CREMEncoder(model, processor, batch_size=2, dim=32)
    assert encoder.mteb_model_meta.embed_dim == 32
    flickr = mteb.get_task("Flickr30kI2TRetrieval").metadata
    where = {"task_metadata": flickr, "hf_split": "test", "hf_subset": "default", "prompt_type": PromptType.query}
    got = encoder.encode([{"image": images}], **where)
    want = encode(model, processor, images=images, instruction=flickr.prompt["query"], batch_size=2, dim=32)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=0)
    assert encoder.encode([], **where).shape == (0, 32)
    with pytest.raises(ValueError, match="dim 128 is larger than the hidden size 64"):
        CREMEncoder(model, processor, dim=128)


@pytest.fixture(scope="module")
def caption_file(tmp_path_factory):
    from helpers import COLOURS, colour_image

    folder = tmp_path_factory.mktemp("captions")
    rows = []
    for i, colour in enumerate(COLOURS):
        colour_image(colour, i).save(folder / f"{colour}.png")
        rows.append({"image": f"{colour}.png", "captions": [f"a {colour} square", colour]})
    (folder / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def crem_eval(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "crem_hf.evaluation.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


def test_crem_eval_dim_as_a_command(exported, caption_file, tmp_path):
    from crem_hf.evaluation.retrieval import evaluate_image_text_retrieval, load_caption_rows

    folder, model, processor = exported
    data, root = str(caption_file / "captions.jsonl"), str(caption_file)
    common = ["retrieval", "--model", str(folder), "--data", data, "--image-root", root, "--device", "cpu"]
    done = crem_eval(*common, "--dim", "16", "--output", str(tmp_path / "at16.json"))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == json.loads((tmp_path / "at16.json").read_text())
    assert printed.pop("embedding_dim") == 16
    rows = load_caption_rows(data, ("captions",), root)
    assert printed == pytest.approx(evaluate_image_text_retrieval(model, processor, rows, dim=16), abs=1e-9)
    # Refusals: an untrained dim and one beyond the hidden size (status 1, one line, nothing written); a dim that is
    # not a positive integer, or a command without embeddings, is bad usage (status 2).
    for dim, fragment in [("24", "dim 24 is not an embedding size"), ("65", "dim 65 is larger than the hidden size")]:
        done = crem_eval(*common, "--dim", dim, "--output", str(tmp_path / "bad.json"))
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith("crem-eval: error:"), done.stderr
        assert fragment in done.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "bad.json").exists()
    assert crem_eval(*common, "--dim", "0").returncode == 2
    generation = ["generation", "--model", str(folder), "--data", data, "--dim", "16"]
    assert crem_eval(*generation).returncode == 2


def test_an_adapter_folder_s_crem_settings_are_checked_on_load(tmp_path):
    from crem_hf.testing import make_tiny_processor
    from crem_hf.training import apply_lora

    processor = make_tiny_processor()
    base = tmp_path / "base"
    make_tiny_crem(processor, seed=5).save_pretrained(base)
    processor.save_pretrained(base)
    adapter = tmp_path / "adapter"
    apply_lora(make_tiny_crem(processor, seed=5)).save_pretrained(adapter)
    processor.save_pretrained(adapter)
    settings = adapter / ADAPTER_CREM_SETTINGS
    assert load_crem(adapter, base_model=base)[0].config.matryoshka_dims is None  # no settings file: the base's
    settings.write_text(json.dumps({"matryoshka_dims": [16, 64]}))
    assert load_crem(adapter, base_model=base)[0].config.matryoshka_dims == [16, 64]
    settings.write_text(json.dumps({"matryoshka_dims": [16, 128]}))
    with pytest.raises(ValueError, match="matryoshka_dims: dim 128 is larger than the hidden size 64"):
        load_crem(adapter, base_model=base)
    settings.write_text(json.dumps({"matryoshka_dims": [16], "pooling": "last"}))
    with pytest.raises(ValueError, match=r"crem_adapter_settings.json in .* holds unknown fields \['pooling'\]"):
        load_crem(adapter, base_model=base)
