"""What keeps a run alive through faults (docs/distill.md, "Faults and bad input"): preemption signals, non-finite
steps, an output folder that cannot be written, and the temporaries a killed save leaves.

* :class:`Preemption`: SIGTERM / SIGINT set a flag; the trainer finishes the step in progress, writes a checkpoint
  and returns. A step that does not finish within ``preempt_timeout`` seconds of the signal is abandoned: the
  process exits (code 128 + signal) saying which checkpoint a resume starts from. A second signal stops at once.
* :class:`NonFiniteGuard`: a step whose gradient norm is NaN or inf never reaches the weights (the optimiser step is
  skipped, the gradients dropped, the schedule advanced); ``max_bad_steps`` consecutive such steps stop the run with
  :class:`TrainingError` naming the step and the last good checkpoint.
* :func:`check_writable` and :func:`remove_stale_temporaries`: before any model is loaded.
"""
from __future__ import annotations

import glob
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import Callable, Optional

import torch

from .config import ConfigError


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite steps, a checkpoint that cannot be written); the message says what
    happened, at which step, and which checkpoint a resume would start from."""


# ----------------------------------------------------------------------------------------------------------------------
# the output folder
# ----------------------------------------------------------------------------------------------------------------------
def check_writable(run_dir: str) -> None:
    """Create ``run_dir`` and write and remove a probe file in it; a :class:`ConfigError` naming ``output_dir``
    otherwise (before any model is loaded or step taken)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"output_dir={run_dir!r} cannot be written ({e.strerror or e}): give a folder this user "
                          f"can create files in") from None


def remove_stale_temporaries(run_dir: str, ckpt_dir: str) -> list[str]:
    """Remove what a killed save leaves: ``.tmp-*`` (a checkpoint file, or ``best/`` / ``final/`` being written)
    and ``.old-*`` (the previous ``best/`` being swapped out) in ``run_dir`` and ``ckpt_dir``. Only rank 0 writes
    there, and it calls this before writing anything, so nothing alive owns them. Returns the removed paths."""
    removed = []
    for folder in (run_dir, ckpt_dir):
        for path in sorted(glob.glob(os.path.join(folder, ".tmp-*")) + glob.glob(os.path.join(folder, ".old-*"))):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# preemption
# ----------------------------------------------------------------------------------------------------------------------
class Preemption:
    """Within ``with Preemption(timeout, last_checkpoint) as p:`` SIGTERM and SIGINT set ``p.requested`` (the
    signal's name) instead of killing the process. Handlers are installed only in the main thread (Python delivers
    signals there); elsewhere, and outside the block, the default behaviour stands.

    ``last_checkpoint()`` names the checkpoint a resume would start from, for the message of an abandoned step."""

    def __init__(self, timeout: float, last_checkpoint: Callable[[], Optional[str]], log: Callable[[str], None]):
        self.timeout, self.last_checkpoint, self.log = timeout, last_checkpoint, log
        self.requested: Optional[str] = None
        self._previous: dict = {}
        self._timer: Optional[threading.Timer] = None

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:          # the second signal: stop now
            self._abandon(signum, f"a second {name}")
        self.requested = name
        # the next signal takes the default path at once (Ctrl-C twice)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        self._timer = threading.Timer(self.timeout, self._abandon, args=(signum, f"{name} + {self.timeout:g} s"))
        self._timer.daemon = True
        self._timer.start()

    def _abandon(self, signum: int, why: str) -> None:
        last = self.last_checkpoint()
        print(f"[distill] {why}: the step in progress did not finish within preempt_timeout; exiting without a new "
              f"checkpoint. " + (f"resume=true continues from {last}" if last else "No checkpoint was written yet."),
              file=sys.stderr, flush=True)
        os._exit(128 + signum)


# ----------------------------------------------------------------------------------------------------------------------
# non-finite steps
# ----------------------------------------------------------------------------------------------------------------------
class NonFiniteGuard:
    """Counts the optimiser steps skipped for a non-finite gradient norm: in a row (``streak``) and in all
    (``total``); both are part of a checkpoint, so a resumed run counts as an uninterrupted one."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.streak = self.total = 0
        self._bad_this_step = False

    def allows(self, grad_norm: float) -> bool:
        """Whether an optimiser step with this gradient norm may update the weights."""
        ok = math.isfinite(grad_norm)
        self._bad_this_step |= not ok
        return ok

    def end_step(self, step: int, last_checkpoint: Callable[[], Optional[str]]) -> bool:
        """Close optimiser step ``step``: whether it was skipped; raises :class:`TrainingError` after
        ``max_bad_steps`` skipped steps in a row."""
        bad, self._bad_this_step = self._bad_this_step, False
        self.streak = self.streak + 1 if bad else 0
        self.total += bad
        if bad and self.streak >= self.max_bad_steps:
            last = last_checkpoint()
            raise TrainingError(
                f"step {step}: {self.streak} optimiser steps in a row had a non-finite gradient norm (NaN or inf) and "
                f"were skipped (max_bad_steps={self.max_bad_steps}); the weights are those of the last finite step. "
                + (f"The last good checkpoint is {last}. " if last else "No checkpoint was written. ")
                + "Lower lr, set grad_clip, or look for a poisoned batch (train/loss in metrics.jsonl).")
        return bad

    def state_dict(self) -> dict:
        return {"streak": self.streak, "total": self.total}

    def load_state_dict(self, state: Optional[dict]) -> None:
        state = state or {}
        self.streak, self.total = int(state.get("streak", 0)), int(state.get("total", 0))


def first_non_finite(state_dict: dict) -> Optional[str]:
    """The name of the first floating-point tensor of ``state_dict`` holding a NaN or inf, or None."""
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None
