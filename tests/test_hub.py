"""Hub export: a complete folder whose remote code, model card demos and sentence-transformers module work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_outputs_match, outputs_of, random_image

from crem_hf.configuration_crem import BACKBONE_AUTO_CLASSES
from crem_hf.hub import CardInfo, export_hub_folder, load_for_export, main, render_model_card, space_files
from crem_hf.testing import BACKBONES, make_tiny_crem, make_tiny_processor
from crem_hf.training import apply_lora

HERE = os.path.dirname(os.path.abspath(__file__))
MMEB_RESULTS = {
    "subsets": {"ImageNet-1K": {"precision_at_1": 0.5, "num_queries": 2}, "N24News": {"precision_at_1": 0.75}},
    "summary": {"Classification": 0.625, "Overall": 0.625},
}


#: Per backbone: the checkpoint the card's metadata names as its base, and the CREM model_type of its folders.
BASES = {
    "qwen2_vl": ("Qwen/Qwen2-VL-2B-Instruct", "crem"),
    "qwen2_5_vl": ("Qwen/Qwen2.5-VL-3B-Instruct", "crem_qwen2_5_vl"),
    "qwen3_vl": ("Qwen/Qwen3-VL-2B-Instruct", "crem_qwen3_vl"),
}
#: Tests of the export that run on every backbone (the others on Qwen2-VL): `exported` takes the backbone.
on_every_backbone = pytest.mark.parametrize("exported", list(BACKBONES), indirect=True)


def trained_adapter(processor, backbone: str = "qwen2_vl"):
    """A peft model on a tiny CREM of `backbone` whose LoRA and chorus rows are not the identity."""
    model = apply_lora(make_tiny_crem(processor, seed=5, backbone=backbone), dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def exported(request, processor, tmp_path_factory):
    """`(folder, reference outputs, backbone)`: a trained adapter exported merged, Qwen2-VL unless parametrized."""
    backbone = getattr(request, "param", "qwen2_vl")
    if backbone != "qwen2_vl":
        processor = make_tiny_processor(backbone=backbone)
    folder = tmp_path_factory.mktemp(f"hub-{backbone}") / "crem-tiny"
    model = trained_adapter(processor, backbone)
    reference = outputs_of(model, processor)
    info = CardInfo(repo_id="org/crem-tiny", base_model=BASES[backbone][0], datasets=["TIGER-Lab/MMEB-train"],
                    eval_results=MMEB_RESULTS)  # fmt: skip
    export_hub_folder(model, processor, folder, info)
    return folder, reference, backbone


def run_clean(code: str, *args, timeout=600) -> subprocess.CompletedProcess:
    """Python in a fresh process, offline, where crem_hf cannot be imported."""
    prelude = f"import sys; sys.modules['crem_hf'] = None; sys.path.insert(0, {HERE!r})\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", prelude + code, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@on_every_backbone
def test_folder_is_complete_and_pickle_free(exported):
    folder, _, backbone = exported
    names = set(os.listdir(folder))
    expected = {
        "config.json", "generation_config.json", "model.safetensors", "configuration_crem.py", "modeling_crem.py",
        "processing_crem.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "README.md", "custom_st.py", "modules.json", "config_sentence_transformers.json",
    }  # fmt: skip
    assert expected <= names, expected - names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    config = json.loads((folder / "config.json").read_text())
    kind = BASES[backbone][1]
    assert config["model_type"] == kind
    assert config["auto_map"] == {k: v for k, v in BACKBONE_AUTO_CLASSES[kind].items() if k != "AutoProcessor"}
    assert config["architectures"] == [BACKBONES[backbone][2].__name__]
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_crem.CREMProcessor"
    }


REMOTE = textwrap.dedent(
    """
    import json
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
    from helpers import outputs_of
    folder, config_class, model_class = sys.argv[1:4]
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == config_class
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    results = []
    for auto in (AutoModel, AutoModelForImageTextToText):
        model = auto.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(model).__name__ == model_class, type(model).__name__
        results.append(outputs_of(model, processor))
    print(json.dumps(results))
    """
)


@on_every_backbone
def test_clean_process_loads_the_folder_and_matches(exported):
    folder, reference, backbone = exported
    crem_class = BACKBONES[backbone][2]
    result = run_clean(REMOTE, str(folder), crem_class.config_class.__name__, crem_class.__name__)
    assert result.returncode == 0, result.stderr[-3000:]
    for remote in json.loads(result.stdout.strip().splitlines()[-1]):
        assert_outputs_match(remote, reference, embeddings_atol=1e-5, logits_atol=1e-4)


def test_every_card_code_block_runs_against_the_folder(exported):
    folder, _, _ = exported
    card = (folder / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) >= 4
    blocks = [block.replace("org/crem-tiny", str(folder)) for block in blocks]
    # The remote code alone runs every block but the visual memory's, which lives in the crem-hf package.
    needs_package = [block for block in blocks if "crem_hf" in block]
    assert len(needs_package) == 1 and "CREMMemory" in needs_package[0]
    result = run_clean("\n".join(block for block in blocks if block not in needs_package))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tensor(" in result.stdout and "(3, 64)" in result.stdout
    with_package = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert with_package.returncode == 0, with_package.stderr[-4000:]
    assert re.search(r"^(red|blue) \['.*'\]$", with_package.stdout, flags=re.M), with_package.stdout[-2000:]


@on_every_backbone
def test_card_metadata_validates(exported):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    folder, _, backbone = exported
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert data.base_model == BASES[backbone][0] and data.datasets == ["TIGER-Lab/MMEB-train"]
    assert {"crem", "custom_code", backbone} <= set(data.tags)
    assert not set(data.tags) & (set(BACKBONES) - {backbone})
    # The text names this backbone and its classes, and no other backbone.
    crem_class, plain_class = BACKBONES[backbone][2], BACKBONES[backbone][1]
    title = crem_class._backbone_title
    assert f"on {title}:" in card.text and f"plain {title}." in card.text
    assert f"`{crem_class.__name__}`" in card.text and f"`{plain_class.__name__}`" in card.text
    others = {cls._backbone_title for _, _, cls in BACKBONES.values()} - {title}
    assert not [other for other in others if re.search(rf"{re.escape(other)}\b", card.text)], others
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "crem-tiny"
    assert sorted((r.dataset_config, r.metric_value) for r in results) == [("ImageNet-1K", 50.0), ("N24News", 75.0)]
    assert "| **Overall** | 62.5 |" in card.text


@on_every_backbone
def test_sentence_transformers_vectors_equal_get_embedding(exported):
    folder, _, _ = exported
    code = textwrap.dedent(
        """
        import json, torch
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel, AutoProcessor
        from helpers import random_image
        folder = sys.argv[1]
        st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
        image = random_image(56, 84, 3)
        vectors = st.encode(["a cat", image, {"text": "a dog", "image": image}], convert_to_tensor=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            reference = torch.cat([
                model.get_embedding(**processor.process_embedding_inputs(texts=["a cat"])),
                model.get_embedding(**processor.process_embedding_inputs(images=[image])),
                model.get_embedding(**processor.process_embedding_inputs(images=[image], texts=["a dog"])),
            ])
        print(json.dumps(float((vectors.cpu() - reference).abs().max())))
        """
    )
    result = run_clean(code, str(folder))
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) <= 1e-5


PIPELINE = textwrap.dedent(
    """
    import json, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
    from helpers import random_image
    folder = sys.argv[1]
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True, device="cpu")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    results = []
    for question, seed in (("What is in the image?", 1), ("Describe it in detail, please.", 2)):
        messages = [{"role": "user", "content": [
            {"type": "image", "image": random_image(56, 84, seed)}, {"type": "text", "text": question}
        ]}]
        piped = pipe(text=messages, max_new_tokens=6, return_full_text=False, generate_kwargs={"do_sample": False})
        batch = processor.process_chat(conversations=[messages], compress_layout=False)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
        answer = processor.batch_decode(ids, skip_special_tokens=True)[0]
        results.append([type(pipe.model).__name__, piped[0]["generated_text"], answer])
    print(json.dumps(results))
    """
)


@on_every_backbone
def test_transformers_pipeline_answers_as_generate(exported):
    """`pipeline("image-text-to-text")` on the exported folder (remote code, the card's pipeline tag) gives the native
    answer that the model's `generate` gives on CREMProcessor's own plain chat prompt (`process_chat`)."""
    folder, _, backbone = exported
    result = run_clean(PIPELINE, str(folder))
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name, piped, answer in results:
        assert name == BACKBONES[backbone][2].__name__
        assert piped == answer and answer
    assert results[0][2] != results[1][2], "the two questions on two images must be answered differently"


def test_merged_equals_adapter_on_base_and_adapter_export(processor, tmp_path):
    base_folder = tmp_path / "base"
    make_tiny_crem(processor, seed=5).save_pretrained(base_folder)  # the base the adapter was trained on
    processor.save_pretrained(base_folder)
    model = trained_adapter(processor)
    adapter_folder = tmp_path / "adapter"
    model.save_pretrained(adapter_folder)
    processor.save_pretrained(adapter_folder)
    merged, loaded_processor = load_for_export(adapter_folder, base_model=base_folder)
    on_base, _ = load_for_export(adapter_folder, base_model=base_folder, merge=False)
    a, b = outputs_of(merged.eval(), loaded_processor), outputs_of(on_base.eval(), loaded_processor)
    assert_outputs_match(a, b, embeddings_atol=1e-5, logits_atol=1e-4)
    adapter_only = export_hub_folder(on_base, loaded_processor, tmp_path / "adapter-export", merge=False)
    assert "adapter_model.safetensors" in os.listdir(adapter_only)
    assert not [n for n in os.listdir(adapter_only) if n.endswith((".bin", ".pt", ".pkl"))]


def test_export_refuses_bad_requests_and_never_leaves_a_half_folder(processor, tmp_path, monkeypatch):
    model = make_tiny_crem(processor, seed=6)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_hub_folder(model, processor, target)
    with pytest.raises(ValueError, match="CREMProcessor"):
        export_hub_folder(model, processor.tokenizer, tmp_path / "other")

    def broken_card(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("crem_hf.hub.render_model_card", broken_card)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_hub_folder(model, processor, target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(target) == ["keep.txt"], "the old folder stays"
    with pytest.raises(RuntimeError):
        export_hub_folder(model, processor, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_missing_processor_and_mismatched_adapter(processor, tmp_path):
    from crem_hf.testing import make_tiny_processor

    bare = tmp_path / "bare"
    make_tiny_crem(processor).save_pretrained(bare)
    with pytest.raises(ValueError, match="no processor"):
        load_for_export(bare)
    adapter = tmp_path / "adapter"
    trained_adapter(processor).save_pretrained(adapter)
    processor.save_pretrained(adapter)
    other = make_tiny_processor(num_chorus_tokens=4)
    other_base = tmp_path / "other-base"
    make_tiny_crem(other).save_pretrained(other_base)
    with pytest.raises(ValueError, match="does not belong to this base"):
        load_for_export(adapter, base_model=other_base)


def test_cli_exports_a_trained_folder(model, processor, tmp_path):
    source = tmp_path / "trained"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    results = tmp_path / "mmeb_results.json"
    results.write_text(json.dumps(MMEB_RESULTS))
    assert main(["--model", str(source), "--output-dir", str(tmp_path / "hub"), "--eval-results", str(results)]) == 0
    assert "MMEB ImageNet-1K" in (tmp_path / "hub" / "README.md").read_text()
    assert main(["--model", str(source), "--output-dir", str(tmp_path / "hub")]) == 1  # not empty: one line
    card = render_model_card(model.config, CardInfo(repo_id="me/x"))
    assert "No evaluation results" in card.text and 'from_pretrained("me/x"' in card.text
    assert random_image(28, 28, 0).size == (28, 28)


def test_space_export_writes_an_app_on_the_model_folder(model, processor, tmp_path):
    from crem_hf.demo.app import load_demo_model

    target = tmp_path / "hub"
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    assert main(["--model", str(saved), "--output-dir", str(target), "--repo-id", "me/tiny", "--space"]) == 0
    assert (target / "requirements.txt").read_text() == "crem-hf[demo]==0.1.0\n"
    source = (target / "app.py").read_text()
    assert source == space_files("me/tiny", "crem-hf[demo]==0.1.0")["app.py"]
    namespace = {"__file__": str(target / "app.py"), "__name__": "space"}
    exec(compile(source, "app.py", "exec"), namespace)  # defines MODEL without serving
    assert namespace["MODEL"] == str(target)
    elsewhere = {"__file__": str(tmp_path / "space" / "app.py"), "__name__": "space"}
    exec(compile(source, "app.py", "exec"), elsewhere)  # a Space holds no model: the Hub id
    assert elsewhere["MODEL"] == "me/tiny"
    loaded, _ = load_demo_model(namespace["MODEL"])
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match="one install line"):
        space_files("me/tiny", "a\nb")


def test_push_uploads_the_exported_folder(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))
            return "https://huggingface.co/me/crem/commit/abc"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    from crem_hf.hub import push_folder

    assert push_folder(tmp_path, "me/crem", private=True, token="t").endswith("/commit/abc")
    assert calls == [("init", "t"), ("create", "me/crem", True, True), ("upload", str(tmp_path), "me/crem")]
