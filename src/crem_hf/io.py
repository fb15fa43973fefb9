"""Writing results and running command lines.

Files: an atomic write never leaves half a file or a temporary file behind (a full disk, an error, Ctrl-C), and never
overwrites a finished file with an unfinished one. Several files written together (`write_files_atomically`) never
appear side by side from two different writes. New files get the permissions the umask gives, like any other tool's
(``tempfile`` alone would make them private).

Command lines: `run_command` gives every console script the same contract: exit status 0 on success, results on
stdout; on a user error (a bad path, argument or input file) exit status 1 and one line ``prog: error: reason`` on
stderr, no traceback (set ``CREM_HF_TRACEBACK=1`` to get it). Bad arguments exit with status 2 and one line too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "USER_ERRORS",
    "ArgumentParser",
    "apply_umask",
    "check_model_source",
    "check_writable_file",
    "check_writable_folder",
    "current_umask",
    "format_markdown_table",
    "positive_int",
    "run_command",
    "write_files_atomically",
    "write_json_atomically",
    "write_text_atomically",
]


# ---------------------------------------------------------------------------------------------------- permissions


def current_umask() -> int:
    """The process umask; read from /proc where possible, since setting it to read it races with other threads."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode() -> int:
    """The mode `open(path, "w")` would give a new file."""
    return 0o666 & ~current_umask()


def apply_umask(folder: str | os.PathLike) -> None:
    """
    Give `folder` and everything under it the modes fresh files and folders get under the umask, for a folder
    assembled by libraries that write private files (safetensors writes its files 0600). Links are left alone.
    """
    mask = current_umask()
    folder = os.fspath(folder)
    os.chmod(folder, 0o777 & ~mask)
    for root, folders, files in os.walk(folder):
        for name in folders:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


# ---------------------------------------------------------------------------------------------------- checks


def check_writable_folder(folder: str | os.PathLike, names: tuple[str, ...] = ()) -> str:
    """
    Make sure files can be written into `folder` before any long work starts: the folder is created if needed, a
    probe file is created and removed in it, and none of `names` (the files to come) may be a folder.

    Raises:
        ValueError: naming the folder (or file) and why it cannot be written.
    """
    folder = os.fspath(folder) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"Output folder {folder} exists and is not a folder.")
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"Cannot write into the output folder {folder}: {error.strerror or error}.") from error
    for name in names:
        if os.path.isdir(os.path.join(folder, name)):
            raise ValueError(f"Cannot write {os.path.join(folder, name)}: it is a folder.")
    return folder


def check_model_source(name_or_path: str, flag: str = "--model") -> str:
    """
    A model argument that can only be a local path (absolute, ``./``, ``../``, ``~`` or more than one ``/``; a Hub id
    is ``name`` or ``org/name``) must exist, so that a typo is named as a missing folder, not as a bad Hub id.
    """
    local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if local and not os.path.exists(os.path.expanduser(name_or_path)):
        raise ValueError(f"{flag} {name_or_path}: no such folder.")
    return name_or_path


def check_writable_file(path: str | os.PathLike) -> str:
    """`check_writable_folder` for the folder of the file `path`, which must not be a folder itself."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(os.sep):
        raise ValueError(f"Output file {path} is a folder; expected the path of a file.")
    check_writable_folder(os.path.dirname(path) or ".")
    return path


# ---------------------------------------------------------------------------------------------------- writes


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _stage(path: str, data: bytes) -> str:
    """
    `data` in a new hidden temporary file beside `path` (same file system, so the rename is atomic), with the
    umask's mode, flushed to disk. Returns its path; on any failure it is removed before the error propagates.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        try:
            os.chmod(temporary, _new_file_mode())  # mkstemp creates 0600 whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view) :]
            os.fsync(handle)
        finally:
            os.close(handle)
    except BaseException:
        _remove_quietly(temporary)
        raise
    return temporary


def write_files_atomically(files: Mapping[str | os.PathLike, str | bytes]) -> None:
    """
    Write several files as one (e.g. results as JSON and as the Markdown table made from them).

    Every file is staged first, so a failure (a full disk) leaves all the old files as they were and no temporary
    file. Then the old files other than the first are removed, and the new files renamed into place, the first one
    first. So at every instant, and after a crash at any point, the files present all come from one write: the old
    set, the old first file alone, or the new first file with some of the others; never one write's file beside
    another's. (A reader that opens one file, then another later, can always straddle a write; reading the first
    file again after the others tells it whether it did.)

    Args:
        files: path -> text (written as UTF-8) or bytes, in order of importance.
    """
    targets = {os.fspath(path): data for path, data in files.items()}
    for path in targets:
        if os.path.isdir(path):
            raise IsADirectoryError(f"Cannot write {path}: it is a folder.")
    staged: dict[str, str] = {}
    try:
        for path, data in targets.items():
            staged[path] = _stage(path, data.encode("utf-8") if isinstance(data, str) else data)
        paths = list(staged)
        for path in paths[1:]:
            _remove_quietly(path)
        for path in paths:
            os.replace(staged[path], path)
            del staged[path]
    finally:
        for temporary in staged.values():
            _remove_quietly(temporary)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (see `write_files_atomically`)."""
    write_files_atomically({path: text})


def write_json_atomically(path: str | os.PathLike, payload: Any) -> None:
    """`write_text_atomically` of `payload` as indented JSON."""
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------- tables


def format_markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """
    A GitHub markdown table (the one writer of every report's table): the header, the rule and one line per row,
    each cell as `str` gives it, ending with a newline.

    Raises:
        ValueError: a row with another number of cells than the header.
    """
    lines = ["| " + " | ".join(str(cell) for cell in header) + " |", "|" + "---|" * len(header)]
    for index, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"Table row {index} has {len(row)} cells for {len(header)} columns.")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- command lines

#: Errors that are the user's to fix (a bad path, argument or input file): reported in one line, without traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors are one line (``prog: error: reason (see prog --help)``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def run_command(prog: str, body: Callable[[], object]) -> int:
    """
    Run a command's `body` and return its exit status: 0 when it returns, 1 after one line on stderr for a user
    error (`USER_ERRORS`), 130 on Ctrl-C. Other exceptions are bugs and propagate with their traceback.
    """
    try:
        body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if os.environ.get("CREM_HF_TRACEBACK"):
            raise
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    return 0
