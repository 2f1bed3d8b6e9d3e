"""Writing files so that a reader never sees half of one (temporary file or folder, fsync, rename),
and refusing tensors that hold NaN or Inf before anything uses them."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a hidden temporary file next to `path`, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it a new file's usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any) -> None:
    """`value` as indented JSON (with a final newline), written with `atomic_write`."""
    text = json.dumps(value, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; some platforms cannot open a folder, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a hidden temporary folder next to `folder`, then swap it into place: a
    reader sees the old folder or the whole new one, never new weights beside an old config.
    Whatever the old folder held that `write` did not rewrite (a heatmap, the user's own files) is
    carried over as hard links, so nothing is copied and nothing is lost."""
    folder = folder.resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    old = folder.parent / f".{folder.name}.old"
    try:
        write(tmp)
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb+") as handle:
                    os.fsync(handle.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        if folder.is_dir():
            _link_missing(folder, tmp)
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            os.replace(old, folder)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(folder.parent)


def _link_missing(source: Path, target: Path) -> None:
    """Hard-link every entry of `source` that `target` lacks into `target` (folders recursively)."""
    for entry in source.iterdir():
        destination = target / entry.name
        if entry.is_dir() and not entry.is_symlink():
            destination.mkdir(exist_ok=True)
            _link_missing(entry, destination)
        elif not destination.exists() and not destination.is_symlink():
            if entry.is_symlink():
                os.symlink(os.readlink(entry), destination)
            else:
                os.link(entry, destination)


def non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an Inf, in order."""
    return [
        name
        for name, tensor in named
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def run_child(command: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, float]:
    """Run a child process (in `env`, default this one's) with its output appended to `log` (after a
    "$ command" line); (return code, wall seconds, its peak RSS in MB from wait4). An interrupt kills
    the child too."""
    start = time.perf_counter()
    with open(log, "a") as sink:
        sink.write(f"$ {shlex.join(command)}\n")
        sink.flush()
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:
            child.kill()
            child.wait()
            raise
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024
