"""scripts/main.sh needs no root, apt or browser; scripts/test.sh installs the browser as well. Run as commands in
a fake environment: a virtual environment whose `python` and `ruff` log their arguments instead of installing or
running anything, a PATH without (or with a logging) apt-get, and a Chromium path that does not exist."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
BASH = shutil.which("bash")


def _stub(path: Path, name: str) -> None:
    """An executable that appends `name args...` to $LOG and succeeds."""
    path.write_text(f'#!{BASH}\necho "{name} $*" >> "$LOG"\n')
    path.chmod(0o755)


@pytest.fixture
def fake(tmp_path):
    """(env, log, tools): a fake venv ($VENV) with logging python and ruff, a PATH of only bash, dirname and id."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'PATH="{venv / "bin"}:$PATH"\n')
    _stub(venv / "bin" / "python", "python")
    _stub(venv / "bin" / "ruff", "ruff")
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("bash", "dirname", "id"):
        os.symlink(shutil.which(name), tools / name)
    log = tmp_path / "log"
    env = {"PATH": str(tools), "VENV": str(venv), "LOG": str(log), "CHROMIUM": str(tmp_path / "no-chromium")}
    return env, log, tools


def run(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SCRIPTS / script), *args], env=env, capture_output=True, text=True, timeout=60)


def logged(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def install_lines(extras: str) -> list[str]:
    return [
        "python -m pip install -q --upgrade pip",
        "python -m pip install -q torch==2.13.0",
        f"python -m pip install -q -e .[{extras}]",
    ]


def test_main_sh_runs_without_apt_or_chromium_and_installs_no_dev_extras(fake):
    env, log, tools = fake
    done = run("main.sh", env, "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert logged(log) == [*install_lines("train,eval,demo"), "python -m crem_hf.demo.main --seed 3"]
    # With apt-get and sudo on the PATH, main.sh still never calls them.
    log.unlink()
    _stub(tools / "apt-get", "apt-get")
    _stub(tools / "sudo", "sudo")
    assert run("main.sh", env).returncode == 0
    assert not [line for line in logged(log) if line.startswith(("apt-get", "sudo"))]


def test_test_sh_installs_the_browser_with_apt_then_lints_and_tests(fake):
    env, log, tools = fake
    _stub(tools / "apt-get", "apt-get")
    _stub(tools / "sudo", "sudo")
    done = run("test.sh", env, "-k", "x")
    assert done.returncode == 0, done.stderr
    apt = ["apt-get update -q", "apt-get install -y -q chromium"]
    if os.getuid() != 0:
        apt = [f"sudo {line}" for line in apt]
    lines = logged(log)
    assert lines[:5] == [*install_lines("dev"), *apt]
    assert lines[5].startswith("ruff format --check") and lines[6].startswith("ruff check")
    assert lines[7:] == ["python -m pytest -q -k x"]


def test_test_sh_without_apt_or_chromium_stops_in_one_line_before_the_tests(fake):
    env, log, _ = fake
    done = run("test.sh", env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Chromium at" in lines[0] and env["CHROMIUM"] in lines[0], done.stderr
    assert logged(log) == install_lines("dev"), "neither ruff nor pytest ran"


def test_install_browser_sh_does_nothing_when_chromium_is_there(fake, tmp_path):
    env, log, tools = fake
    _stub(tools / "apt-get", "apt-get")
    browser = tmp_path / "chromium"
    _stub(browser, "chromium")
    done = run("install-browser.sh", {**env, "CHROMIUM": str(browser)})
    assert done.returncode == 0 and logged(log) == []


def test_the_main_job_imports_nothing_from_the_dev_only_extras():
    """What main.sh installs (train, eval, demo extras) suffices: the main job's modules, its lazy imports included,
    load with the packages only the dev extra brings made unimportable."""
    dev_only = ["playwright", "moto", "mteb", "sentence_transformers", "pytest", "ruff"]
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {dev_only!r}:
            raise ImportError(f"dev-only package {{name}} imported")
sys.meta_path.insert(0, Block())
import crem_hf.demo.main, crem_hf.demo.memory_stage, crem_hf.memory.cli
import matplotlib.pyplot, sklearn.datasets, sklearn.model_selection  # main.py and digits.py import them lazily
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
