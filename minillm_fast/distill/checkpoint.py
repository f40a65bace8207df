"""Checkpoints: one file per save, written atomically, the newest ones kept.

A checkpoint is written to a temporary file in the checkpoint directory, flushed and fsynced, then renamed over its
final name with ``os.replace`` (atomic on POSIX): a crash mid-write leaves the earlier checkpoints untouched and at
worst a ``.tmp-*`` file, which :func:`latest` ignores and the next save removes. Files are ``step_00000100.pt``.

Checkpoints hold Python objects (RNG states, the rollout buffer), so they load with ``weights_only=False``: load only
checkpoints you wrote.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:08d}.pt")


def _atomic_replace(path: str, suffix: str, mode: str, write: Callable) -> None:
    """Write a file by ``write(f)`` into a temporary sibling, fsync it, rename it over ``path`` and fsync the folder:
    a kill at any moment leaves the old file or the new one, never a part (and ``.tmp-*`` at worst)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)``, all or nothing."""
    _atomic_replace(path, ".pt", "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    """Replace the file ``path`` by one holding ``text``, all or nothing."""
    _atomic_replace(path, ".txt", "w", lambda f: f.write(text))


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (a crash of the machine after it cannot undo it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save_pretrained(model, tokenizer, path: str, state_dict: Optional[dict] = None) -> None:
    """``save_pretrained`` into a temporary sibling directory, then swapped in place of ``path``. ``state_dict``:
    the weights to write instead of the model's own (the gathered full state of an FSDP-sharded model)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    try:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(path)}-")
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the complete checkpoints in ``directory``, oldest first."""
    out = []
    for p in glob.glob(os.path.join(directory, "step_*.pt")):
        m = _NAME.match(os.path.basename(p))
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(directory: str) -> Optional[str]:
    ckpts = list_checkpoints(directory)
    return ckpts[-1][1] if ckpts else None


def prune(directory: str, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints, and stale temporary files."""
    for _, p in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        os.unlink(p)
    for p in glob.glob(os.path.join(directory, ".tmp-*")):
        try:
            os.unlink(p)
        except OSError:
            pass


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
