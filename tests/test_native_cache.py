"""The native extension's JIT cache (minillm_fast/native.py, "The JIT cache"): one folder per build key, so that
installs with different sources coexist on one machine, and a finished build loads without torch's lock.

Without building: the key follows the sources' bytes (not their path or mtime), the flags, torch, the compiler and
the capability (and, for the CUDA extension, the target architectures). With builds, each in a subprocess (the
extension is never loaded twice into the test process) and a timeout (a hang fails, it does not block CI):

* the suite's own build (test_native.py's, in the usual cache; built here if it is missing) is copied into a
  temporary ``TORCH_EXTENSIONS_DIR``, and a copy of ``csrc/`` at another path loads it without compiling;
* a stub source tree (a tiny pybind module under the same file names: a few seconds to build) gets its own folder,
  in spite of a stale torch ``lock`` planted there beforehand, and afterwards the real build still loads as it was;
* a stale ``lock`` in the folder of a current build does not delay its load.

No test here compiles the real sources unless the usual cache lacks them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm_fast import native, native_cuda

CAP = native.capability()
SUFFIX = ".pyd" if sys.platform == "win32" else ".so"
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in the build folder

# Loads the JIT extension of the sources in argv[1] (default: the package's) and says what it loaded.
LOAD_SCRIPT = """
import sys, time
from pathlib import Path
t0 = time.perf_counter()
from minillm_fast import native
mod = native._jit_build(native.capability(), Path(sys.argv[1]) if len(sys.argv) > 1 else None)
print("FILE", mod.__file__)
import torch
print("ROWS", hasattr(getattr(torch.ops, native.OPS_NAMESPACE), "divergence_rows"))
print("SECONDS", time.perf_counter() - t0)
"""

STUB_MODULE = """#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.attr("stub") = true; }
"""


def _copy_sources(dst: Path, src: Path | None = None) -> Path:
    """The files the key covers, copied to dst (new mtimes)."""
    src = native.source_dir() if src is None else src
    dst.mkdir(parents=True)
    for f in native.SOURCES + native.HEADERS:
        shutil.copyfile(src / f, dst / f)
    return dst


def _toolchain_missing() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available()


# ----------------------------------------------------------------------------------------------------------------------
# the key (no build)
# ----------------------------------------------------------------------------------------------------------------------
def test_key_follows_the_sources_bytes_not_their_path(tmp_path):
    name = native.build_name(CAP)
    assert re.fullmatch(rf"minillm_fast_native_{CAP.lower()}_[0-9a-f]{{12}}", name)
    a, b = _copy_sources(tmp_path / "checkout"), _copy_sources(tmp_path / "venv" / "site-packages" / "csrc")
    assert native.build_name(CAP, a) == native.build_name(CAP, b) == name
    os.utime(a / native.SOURCES[0], (0, 0))  # a checkout that changes only mtimes
    assert native.build_name(CAP, a) == name
    for f in native.SOURCES + native.HEADERS:  # one added comment in any file gives another build
        c = _copy_sources(tmp_path / f"changed-{f}")
        with open(c / f, "a") as fh:
            fh.write("\n// a harmless comment\n")
        assert native.build_name(CAP, c) != name, f


@pytest.mark.parametrize("change", ["capability", "cflags", "ldflags", "torch", "torch_git", "cxx"])
def test_key_follows_flags_torch_compiler_and_capability(monkeypatch, change):
    name = native.build_name(CAP)
    cap = CAP
    if change == "capability":
        cap = "DEFAULT" if CAP != "DEFAULT" else "AVX2"
    elif change == "cflags":
        monkeypatch.setattr(native, "_COMMON_FLAGS", native._COMMON_FLAGS + ["-g"])
    elif change == "ldflags":
        monkeypatch.setattr(native, "LDFLAGS", native.LDFLAGS + ["-s"])
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".post1")
    elif change == "torch_git":
        monkeypatch.setattr(torch.version, "git_version", "0" * 40)
    elif change == "cxx":
        monkeypatch.setenv("CXX", "clang++")
    other = native.build_name(cap)
    assert other != name and other.startswith(f"minillm_fast_native_{cap.lower()}_")


def test_key_names_python_and_platform():
    s = native.build_settings(CAP)
    assert s["python"].startswith(sys.implementation.cache_tag) and s["torch"] == torch.__version__
    assert s["cflags"] == native.cflags(CAP) and s["capability"] == CAP


def test_a_build_leaves_the_key_alone_and_names_its_folder(monkeypatch, tmp_path, capsys):
    """torch's ``load`` appends its own -L / -l flags to the ``extra_ldflags`` list it is given: the loader hands it
    copies, so that a process that has built computes the key of one that has not. The first-use message and the
    error name the build folder. (torch's ``load`` is faked: no build.)"""
    import torch.utils.cpp_extension as cpp

    if _toolchain_missing():
        pytest.skip("no C++ compiler or ninja")
    name, ldflags = native.build_name(CAP), list(native.LDFLAGS)

    def fake_load(name, sources, extra_cflags=None, extra_ldflags=None, build_directory=None, **kw):
        assert build_directory == str(tmp_path / name)
        extra_ldflags += ["-L/somewhere", "-ltorch"]
        extra_cflags += ["-DFAKE"]
        raise RuntimeError("fake compiler error")

    monkeypatch.setattr(cpp, "load", fake_load)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.raises(native.NativeBuildError, match=f"in {re.escape(str(tmp_path / name))} failed: fake compiler"):
        native._jit_build(CAP)
    assert f"compiling the native extension ({CAP}) into {tmp_path / name} " in capsys.readouterr().err
    assert native.LDFLAGS == ldflags and native.build_name(CAP) == name


def test_cuda_key_follows_content_and_architectures(tmp_path, monkeypatch):
    """native_cuda.py shares the cache (no GPU needed to compute its key: TORCH_CUDA_ARCH_LIST names the targets)."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    src = native_cuda.source_dir()

    def copy(dst):
        for f in native_cuda.SOURCES + native_cuda.HEADERS:
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f, dst / f)
        return dst

    name = native_cuda.build_name()
    assert re.fullmatch(r"minillm_fast_native_cuda_[0-9a-f]{12}", name)
    assert native_cuda.build_name(copy(tmp_path / "a")) == name
    c = copy(tmp_path / "c")
    with open(c / native_cuda.HEADERS[0], "a") as fh:
        fh.write("\n// a harmless comment\n")
    assert native_cuda.build_name(c) != name
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert native_cuda.build_name() != name
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(native_cuda, "NVCC_FLAGS", native_cuda.NVCC_FLAGS + ["-G"])
    assert native_cuda.build_name() != name


# ----------------------------------------------------------------------------------------------------------------------
# builds (in subprocesses)
# ----------------------------------------------------------------------------------------------------------------------
def _load(root: Path | None, src: Path | None = None, timeout: float = 120) -> tuple[dict, str]:
    """Run LOAD_SCRIPT with TORCH_EXTENSIONS_DIR=root (None: as this process has it); its report and stderr."""
    env = dict(os.environ)
    if root is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(root)
    cmd = [sys.executable, "-c", LOAD_SCRIPT] + ([str(src)] if src is not None else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"loading the extension took over {timeout} s (a hang?); stderr:\n{err[-3000:]}")
    assert proc.returncode == 0, f"the load failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    report = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line[:4] in ("FILE", "ROWS", "SECO"))
    return report, proc.stderr


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(root, name): a temporary TORCH_EXTENSIONS_DIR holding a copy of the current build of the real sources, taken
    from the usual cache (where test_native.py has built it; built there now if it is missing)."""
    if _toolchain_missing():
        pytest.skip("no C++ compiler or ninja: the native extension cannot be built here")
    report, _ = _load(None, timeout=900)
    built = Path(report["FILE"]).parent
    name = native.build_name(CAP)
    assert built.name == name
    root = tmp_path_factory.mktemp("torch_extensions")
    shutil.copytree(built, root / name, ignore=shutil.ignore_patterns(TORCH_LOCK, native.BUILD_LOCK, "*.tmp"))
    return root, name


def _lib(root: Path, name: str) -> Path:
    return root / name / f"{name}{SUFFIX}"


def test_identical_sources_at_another_path_share_the_build(cache, tmp_path):
    root, name = cache
    before = _lib(root, name).stat().st_mtime_ns
    report, err = _load(root, _copy_sources(tmp_path / "second-checkout"))
    assert "compiling" not in err, err
    assert Path(report["FILE"]) == _lib(root, name) and report["ROWS"] == "True"
    assert _lib(root, name).stat().st_mtime_ns == before


def test_different_sources_get_their_own_build_and_leave_the_other(cache, tmp_path):
    """A stub tree (the key's file names, different bytes) builds into its own folder, where a killed build's stale
    torch lock is removed with a message instead of hanging; the real build then loads untouched, and so does the
    stub's."""
    root, name = cache
    before = _lib(root, name).stat().st_mtime_ns
    stub = tmp_path / "stub"
    stub.mkdir()
    for f in native.SOURCES:
        (stub / f).write_text(STUB_MODULE if f == native.SOURCES[0] else "// stub\n")
    for f in native.HEADERS:
        (stub / f).write_text("#pragma once\n")
    stub_name = native.build_name(CAP, stub)
    assert stub_name != name
    (root / stub_name).mkdir()
    (root / stub_name / TORCH_LOCK).touch()  # left by a process killed while it built

    t0 = time.perf_counter()
    report, err = _load(root, stub, timeout=420)
    print(f"stub build: {time.perf_counter() - t0:.1f} s")
    assert f"compiling the native extension ({CAP}) into {root / stub_name} " in err, err
    assert f"removing the stale lock {root / stub_name / TORCH_LOCK}" in err, err
    assert Path(report["FILE"]) == _lib(root, stub_name) and report["ROWS"] == "False"
    assert (root / stub_name / native.STAMP).is_file() and not (root / stub_name / TORCH_LOCK).exists()

    report, err = _load(root)
    assert "compiling" not in err, err
    assert Path(report["FILE"]) == _lib(root, name) and report["ROWS"] == "True"
    assert _lib(root, name).stat().st_mtime_ns == before
    stub_before = _lib(root, stub_name).stat().st_mtime_ns
    report, err = _load(root, stub)
    assert "compiling" not in err and Path(report["FILE"]) == _lib(root, stub_name), err
    assert _lib(root, stub_name).stat().st_mtime_ns == stub_before


def test_stale_lock_does_not_block_a_current_build(cache):
    """A process killed while torch's loader held ``lock`` leaves it behind: the next load of the current build does
    not wait on it (torch's loader would, forever and silently)."""
    root, name = cache
    lock = root / name / TORCH_LOCK
    lock.touch()
    try:
        report, err = _load(root, timeout=60)
    finally:
        lock.unlink(missing_ok=True)
    assert "compiling" not in err and "waiting" not in err, err
    assert Path(report["FILE"]) == _lib(root, name) and report["ROWS"] == "True"
    assert float(report["SECONDS"]) < 30

