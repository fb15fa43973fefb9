"""The design card's layout: the Hub remote-code set lives at the top of the repository, once, and is what the package
runs, what a wheel ships and what `crem-export` writes; it imports only torch, transformers, PIL and each other."""

from __future__ import annotations

import ast
import filecmp
import json
import os
import subprocess
import sys
import zipfile

import pytest

import crem_hf.configuration_crem
import crem_hf.modeling_crem
import crem_hf.processing_crem
from crem_hf.hub import CardInfo, export_hub_folder
from crem_hf.testing import published_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_CODE = ("configuration_crem.py", "modeling_crem.py", "processing_crem.py")
ALLOWED_PACKAGES = {"torch", "transformers", "PIL"}


def test_the_remote_code_set_is_at_the_top_and_the_package_runs_it():
    modules = {
        "configuration_crem.py": crem_hf.configuration_crem,
        "modeling_crem.py": crem_hf.modeling_crem,
        "processing_crem.py": crem_hf.processing_crem,
    }
    for name, module in modules.items():
        top = os.path.join(REPO, name)
        assert os.path.isfile(top) and not os.path.islink(top), name
        # One copy: the package's module is a link to the top-level file.
        in_package = os.path.join(REPO, "src", "crem_hf", name)
        assert os.path.islink(in_package), f"src/crem_hf/{name} should link to ../../{name}"
        assert os.path.realpath(module.__file__) == os.path.realpath(top)


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_the_remote_code_set_imports_only_torch_transformers_pil_and_each_other(name):
    tree = ast.parse(open(os.path.join(REPO, name), encoding="utf-8").read())
    siblings = {os.path.splitext(n)[0] for n in REMOTE_CODE}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: must be a sibling of the set
                assert node.module in siblings, f"{name}: from .{node.module} import ..."
                continue
            roots = [node.module.split(".")[0]]
        else:
            continue
        for root in roots:
            assert root in ALLOWED_PACKAGES or root in sys.stdlib_module_names, f"{name} imports {root}"


def test_crem_export_writes_exactly_the_remote_code_set(model, processor, tmp_path):
    folder = tmp_path / "crem-tiny"
    export_hub_folder(model, processor, folder, CardInfo(repo_id="org/crem-tiny"))
    written = {n for n in os.listdir(folder) if n.endswith(".py")}
    # custom_st.py is the sentence-transformers module, not transformers remote code.
    assert written - {"custom_st.py"} == set(REMOTE_CODE)
    for name in REMOTE_CODE:
        assert filecmp.cmp(folder / name, os.path.join(REPO, name), shallow=False), name


@pytest.mark.slow
def test_a_wheel_ships_the_remote_code_set_as_files(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = [n for n in os.listdir(tmp_path) if n.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as archive:
        for name in REMOTE_CODE:
            shipped = archive.read(f"crem_hf/{name}")
            assert shipped == open(os.path.join(REPO, name), "rb").read(), name
        assert not [n for n in archive.namelist() if n.split("/")[0] in {os.path.splitext(r)[0] for r in REMOTE_CODE}]
        # The published configs the tiny Qwen2.5-VL / Qwen3-VL models are built from (the demo runs from a wheel).
        for name in ("qwen2.5-vl-3b", "qwen3-vl-2b"):
            assert json.loads(archive.read(f"crem_hf/backbone_configs/{name}.json")) == published_config(name), name
