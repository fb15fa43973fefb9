"""Files the package writes: atomic (nothing left behind on a full disk), results pairs that always match, the
umask's permissions, and hidden export folders of killed exports cleaned up without touching live ones."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from helpers import colour_image

from crem_hf.io import format_markdown_table, write_json_atomically, write_text_atomically

HERE = os.path.dirname(os.path.abspath(__file__))
IO_MODULE = os.path.join(HERE, os.pardir, "src", "crem_hf", "io.py")


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------------------------------------- atomic writes


def test_atomic_writes_honour_the_umask(tmp_path):
    for mask, file_mode, folder_mode in ((0o022, 0o644, 0o755), (0o077, 0o600, 0o700)):
        with umask(mask):
            folder = tmp_path / f"out-{mask:o}"
            write_text_atomically(folder / "a.md", "a\n")
            write_json_atomically(folder / "b.json", {"b": 1})
            write_json_atomically(folder / "b.json", {"b": 2})  # replaced: same rule
        assert mode(folder) == folder_mode
        assert {name: mode(folder / name) for name in os.listdir(folder)} == dict.fromkeys(
            ["a.md", "b.json"], file_mode
        )


def test_a_full_disk_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "run_summary.json"
    target.write_text("old")
    real_write = os.write

    def full_disk(fd, data):
        if len(data) > 4:  # a few bytes go through, then the disk is full
            real_write(fd, bytes(data[:4]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError) as error:
        write_json_atomically(target, {"loss": list(range(100))})
    assert error.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["run_summary.json"] and target.read_text() == "old"
    monkeypatch.setattr(os, "write", real_write)

    def failed_rename(source, destination):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", failed_rename)
    with pytest.raises(OSError):
        write_text_atomically(target, "new")
    assert os.listdir(tmp_path) == ["run_summary.json"] and target.read_text() == "old"


def test_a_real_file_size_limit_leaves_nothing_behind(tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE, as a full disk would): no `tmp*.tmp` file stays."""
    target = tmp_path / "results.json"
    target.write_text("old")
    code = f"""
import importlib.util, resource, signal, sys
spec = importlib.util.spec_from_file_location("crem_io", {IO_MODULE!r})
crem_io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(crem_io)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    crem_io.write_text_atomically(sys.argv[1], "x" * 100000)
except OSError as error:
    print(error.errno)
"""
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str(errno.EFBIG), done.stderr
    assert os.listdir(tmp_path) == ["results.json"] and target.read_text() == "old"


class FolderWatcher:
    """Spies on renames and removals: the folder's files as a reader sees them after every step, and a crash at
    step `crash_at` (the step raises, as a power cut would stop the writer there)."""

    def __init__(self, monkeypatch, folder, crash_at: int | None = None):
        self.folder, self.crash_at, self.views, self.steps = str(folder), crash_at, [], 0
        for name in ("replace", "unlink", "remove", "rename"):
            monkeypatch.setattr(os, name, self._spy(getattr(os, name)))

    def _spy(self, function):
        def step(path, *args, **kwargs):
            if self.crash_at is not None and self.steps == self.crash_at:
                self.crash_at = None  # once: the writer's own clean-up runs after it
                raise KeyboardInterrupt("crash")
            result = function(path, *args, **kwargs)
            self.steps += 1
            self.views.append(self.files())
            return result

        return step

    def files(self) -> dict[str, str]:
        return {
            name: open(os.path.join(self.folder, name), encoding="utf-8").read()
            for name in sorted(os.listdir(self.folder))
            if not name.startswith(".")
        }


def test_a_group_write_never_shows_files_of_two_writes(tmp_path, monkeypatch):
    from crem_hf.io import write_files_atomically

    def write(generation: str):
        write_files_atomically({tmp_path / name: generation for name in ("results.json", "results.md", "extra.txt")})

    def consistent(view: dict[str, str]) -> bool:
        return len(set(view.values())) <= 1 and (not view or "results.json" in view)

    write("old")
    watcher = FolderWatcher(monkeypatch, tmp_path)
    write("new")
    assert watcher.views and all(consistent(view) for view in watcher.views), watcher.views
    assert watcher.views[-1] == dict.fromkeys(["extra.txt", "results.json", "results.md"], "new")
    for crash_at in range(watcher.steps):
        monkeypatch.undo()
        for name in os.listdir(tmp_path):
            os.unlink(tmp_path / name)
        write("old")
        FolderWatcher(monkeypatch, tmp_path, crash_at)
        with pytest.raises(KeyboardInterrupt):
            write("new")
        left = os.listdir(tmp_path)
        assert not [name for name in left if name.startswith(".")], f"temporary files left at step {crash_at}"
        view = {name: (tmp_path / name).read_text() for name in left}
        assert consistent(view) and view, (crash_at, view)


def test_mmeb_results_json_and_table_always_match(model, processor, tmp_path, monkeypatch):
    from crem_hf.evaluation import evaluate_mmeb, markdown_table

    rows = [
        {
            "qry_text": "<|image_1|>\nClassify.",
            "qry_img_path": f"{c}.png",
            "tgt_text": [c, "x"],
            "tgt_img_path": ["", ""],
        }
        for c in ("red", "blue")
    ]
    for i, colour in enumerate(("red", "blue")):
        colour_image(colour, i).save(tmp_path / f"{colour}.png")
    for subset in ("ImageNet-1K", "N24News"):
        (tmp_path / f"{subset}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "res"

    def matching(view: dict[str, str]) -> bool:
        if "mmeb_results.md" not in view:
            return True
        results = json.loads(view["mmeb_results.json"])
        scores = {name: subset["precision_at_1"] for name, subset in results["subsets"].items()}
        return view["mmeb_results.md"] == markdown_table(scores)

    with umask(0o027):
        evaluate_mmeb(model, processor, tmp_path, ["ImageNet-1K"], str(tmp_path), out, batch_size=4)
        watcher = FolderWatcher(monkeypatch, out)
        evaluate_mmeb(model, processor, tmp_path, ["ImageNet-1K", "N24News"], str(tmp_path), out, batch_size=4)
    assert watcher.views and all(matching(view) for view in watcher.views), watcher.views
    assert "N24News" in watcher.views[-1]["mmeb_results.md"]
    assert mode(out) == 0o750 and mode(out / "mmeb_results.json") == mode(out / "mmeb_results.md") == 0o640


def test_mmeb_checks_its_output_folder_before_scoring(model, processor, tmp_path, monkeypatch):
    from crem_hf.evaluation import evaluate_mmeb

    def never(*args, **kwargs):
        raise AssertionError("scored before checking the output folder")

    monkeypatch.setattr("crem_hf.evaluation.mmeb.score_subset", never)
    monkeypatch.setattr("crem_hf.evaluation.mmeb.load_mmeb_subset", never)
    (tmp_path / "file").write_text("x")
    for output in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ValueError, match=re.escape(str(output))):
            evaluate_mmeb(model, processor, tmp_path, ["ImageNet-1K"], None, output)
    (tmp_path / "res" / "mmeb_results.md").mkdir(parents=True)
    with pytest.raises(ValueError, match="mmeb_results.md: it is a folder"):
        evaluate_mmeb(model, processor, tmp_path, ["ImageNet-1K"], None, tmp_path / "res")


# ---------------------------------------------------------------------------------------------------- exports


def tree_modes(folder) -> dict[str, int]:
    modes = {".": mode(folder)}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(root, name)
            modes[os.path.relpath(path, folder)] = mode(path)
    return modes


def test_exported_folder_honours_the_umask(model, processor, tmp_path):
    from crem_hf.hub import export_hub_folder

    for mask, file_mode, folder_mode in ((0o022, 0o644, 0o755), (0o077, 0o600, 0o700)):
        with umask(mask):
            folder = export_hub_folder(model, processor, tmp_path / f"hub-{mask:o}")
        modes = tree_modes(folder)
        assert {"custom_st.py", "modules.json", "model.safetensors", "config.json", "README.md"} <= set(modes)
        wrong = {
            name: oct(value)
            for name, value in modes.items()
            if value != (folder_mode if os.path.isdir(os.path.join(folder, name)) else file_mode)
        }
        assert not wrong, (oct(mask), wrong)


def hidden(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


STALLED_EXPORT = """
import sys, time
import crem_hf.hub as hub
from crem_hf.testing import make_tiny_crem, make_tiny_processor

processor = make_tiny_processor()
model = make_tiny_crem(processor, seed=0)

def stall(*args, **kwargs):  # the weights are written; stop here until killed
    print("staged", flush=True)
    time.sleep(600)

hub.render_model_card = stall
hub.export_hub_folder(model, processor, sys.argv[1])
"""


def test_a_killed_export_is_cleaned_up_and_a_live_one_is_left_alone(model, processor, tmp_path):
    from crem_hf.hub import export_hub_folder

    target = tmp_path / "crem"
    other = subprocess.Popen(
        [sys.executable, "-c", STALLED_EXPORT, str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "staged", "the other export did not start"
        (staging,) = [name for name in hidden(tmp_path) if os.path.isdir(tmp_path / name)]
        assert staging.startswith(".crem.incomplete-") and (tmp_path / staging / "model.safetensors").is_file()
        weights = (tmp_path / staging / "model.safetensors").read_bytes()

        export_hub_folder(model, processor, target)  # while the other export runs
        assert (tmp_path / staging / "model.safetensors").read_bytes() == weights, "a live export was touched"
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait(timeout=60)
    assert staging in hidden(tmp_path)  # what `kill -9` leaves
    export_hub_folder(model, processor, target, overwrite=True)
    assert hidden(tmp_path) == [] and os.listdir(tmp_path) == ["crem"]


def test_stale_export_folders_go_and_others_stay(model, processor, tmp_path):
    import fcntl

    from crem_hf.hub import export_hub_folder

    def plant(name: str, age: float = 0.0):
        path = tmp_path / name
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 10)
        if age:
            os.utime(path, (time.time() - age, time.time() - age))
        return name

    dead = [plant(".crem.incomplete-dead0001"), plant(".crem.incomplete-dead0001.old")]
    (tmp_path / ".crem.incomplete-dead0001.lock").write_text("")  # its owner is gone: nobody holds the lock
    orphan_lock = ".crem.incomplete-orphan01.lock"
    (tmp_path / orphan_lock).write_text("")
    old_version = [plant(".crem.incomplete-legacy01", age=7200), plant(".crem.old-legacy02", age=7200)]
    recent_old_version = plant(".crem.incomplete-legacy03", age=10)  # may belong to a running older version
    live = plant(".crem.incomplete-live0001")
    live_lock = open(tmp_path / ".crem.incomplete-live0001.lock", "w")  # a live export holds its lock
    fcntl.flock(live_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    unrelated = plant(".other.incomplete-dead0002")
    try:
        export_hub_folder(model, processor, tmp_path / "crem")
    finally:
        live_lock.close()
    left = hidden(tmp_path)
    assert not set(dead + old_version + [orphan_lock, ".crem.incomplete-dead0001.lock"]) & set(left), left
    assert left == sorted([recent_old_version, live, live + ".lock", unrelated])


def test_every_report_table_comes_from_one_writer():
    assert format_markdown_table(["a", "b"], [[1, "x"], ("2", 3.5)]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2 | 3.5 |\n"
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        format_markdown_table(["a", "b"], [[1, 2], [3]])
