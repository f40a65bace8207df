"""The ``native`` backend: the C++ extension of csrc/, compiled on first use (or ahead of time by setup.py).

Loading. :func:`load` imports ``minillm_fast._native_<isa>`` when ``MINILLM_FAST_BUILD_EXT=1 pip install
--no-build-isolation .`` built it ahead of time; otherwise it compiles the ``SOURCES`` of ``csrc/`` with
``torch.utils.cpp_extension.load`` (g++ and ninja, 1-3 minutes) into torch's extensions cache, where later processes
find it in about a second. Either way it happens once per process; :func:`is_available` reports whether it worked
and :func:`build_error` why not.

The JIT cache. Each build has its own folder, ``<root>/minillm_fast_native_<isa>_<key>`` (:func:`build_dir`), where
``<root>`` is ``TORCH_EXTENSIONS_DIR`` or torch's default ``~/.cache/torch_extensions/py<XY>_<cpu|cuXYZ>``, and
``<key>`` (:func:`build_name`) hashes what determines the build: the bytes of every source and header, the compile
and link flags, the capability, torch's version (and git revision, C++ ABI), Python's ABI, the platform and ``CXX``.
So installs on one machine (a checkout and a pip install, two venvs) never rebuild each other's extension:
identical sources share one build whatever their paths (and a ``git checkout`` that changes only mtimes rebuilds
nothing), different sources get different folders. A finished build leaves ``minillm_fast_build.json`` (the key's
ingredients, the library's size and mtime) next to the library; while it matches, a process imports the library
directly, without torch's loader and its ``lock`` file, so a process killed while loading cannot make the next ones
wait. A build runs under an ``fcntl`` lock on ``minillm_fast.flock``, which the kernel releases when its holder
dies; the process that gets it deletes torch's ``lock`` if one is there (only a killed build can have left it), and
says so. The first-use message names the build folder. Nothing is cleaned up automatically: folders of old keys are
harmless and can be deleted.

What it holds. The row kernels of the ops, registered as torch.library ops ``torch.ops.minillm_fast_native.*``
(:func:`ops`): ``divergence_rows`` (fused_divergence_cpu.cpp and divergence_cols_cpu.cpp: the rows function of the
chunked fused divergence), ``token_logprobs_fwd_rows`` / ``_bwd_rows`` and ``rollout_statistics_rows``
(token_stats_cpu.cpp), ``mixture_sample_rows`` (sampling_cpu.cpp), and ``capability()``, the instruction set the
library was compiled for. Each kernel takes one chunk's logits ``[C, V]``; the chunk loops and matmuls are Python's
(minillm_fast/backends/native.py, the backend that calls them; this module only builds and loads the extension). The
extension's Python module (defined in fused_divergence_cpu.cpp) holds no functions: it is what is imported, by torch's
JIT loader or as the ahead-of-time ``minillm_fast._native_<isa>``, and importing it loads the library, which
registers the ops.

Instruction set. The kernels are written with ``at::vec::Vectorized``, whose width is fixed when the file is compiled
(by ``CPU_CAPABILITY`` and the ``-m`` flags). The extension is built for the capability ATen itself runs with on this
machine (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or DEFAULT), with the flags ATen's own CPU kernels
use for it, and the capability is part of the module's name. So a cache shared by machines with different CPUs (a
network home, a CI cache) never hands one a build for instructions it lacks, ``ATEN_CPU_CAPABILITY=default`` selects
the portable build, and an ahead-of-time install carries one module per capability and imports the right one at
run time. ``-march=native`` is avoided on purpose: it bakes in whatever the build machine has under a name that does
not say so.

This module imports nothing from the package (setup.py loads it by path to share the flags and sources).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

try:
    import fcntl
except ImportError:  # Windows: builds are not serialised by minillm-fast, torch's own lock alone guards them
    fcntl = None

SOURCES = ("fused_divergence_cpu.cpp", "divergence_cols_cpu.cpp", "token_stats_cpu.cpp", "sampling_cpu.cpp")
# Included by the sources (hashed into the build key with them, so that a change gets its own build; listed also so
# that an incomplete csrc/ is refused).
HEADERS = ("native_common.h", "divergence_math.h", "philox.h")
# The torch.library namespace of the extension's kernels (every one of them; the Python module is only for loading):
# torch.ops.minillm_fast_native.* once the library is loaded.
OPS_NAMESPACE = "minillm_fast_native"
# -fopenmp: at::parallel_for is an inline template over `#pragma omp parallel` and runs serially without it. The
# library then needs libgomp.so.1, which resolves to the copy torch has loaded, so torch.set_num_threads governs it.
_COMMON_FLAGS = ["-O3", "-fopenmp"]
CAPABILITY_FLAGS = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
}
LDFLAGS = ["-fopenmp"]


class NativeBuildError(RuntimeError):
    """The native extension cannot be built or loaded here; the message says why and what to do."""


def capability() -> str:
    """The instruction set to build for: ATen's own choice on this machine, DEFAULT off x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in CAPABILITY_FLAGS else "DEFAULT"


def cflags(cap: str) -> list[str]:
    return _COMMON_FLAGS + CAPABILITY_FLAGS[cap]


def module_name(cap: str) -> str:
    """Name of the extension module built for ``cap`` (the ahead-of-time one lives in the package)."""
    return f"_native_{cap.lower()}"


def source_dir() -> Path:
    """csrc/: inside the installed package (package data), else at the repository root (source tree, editable)."""
    here = Path(__file__).resolve().parent
    for d in (here / "csrc", here.parent / "csrc"):
        if all((d / s).is_file() for s in SOURCES + HEADERS):
            return d
    raise NativeBuildError(f"the native extension's sources ({', '.join(SOURCES + HEADERS)}) are not in "
                           f"{here / 'csrc'} or {here.parent / 'csrc'}; reinstall minillm-fast from a complete source "
                           "tree")


def _check_toolchain() -> None:
    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise NativeBuildError(
            f"backend='native' compiles a C++ extension on first use, but the compiler {cxx!r} was not found: install "
            "one (Debian/Ubuntu: apt-get install g++; conda: conda install gxx_linux-64) or point CXX at it; or use "
            "backend='torch'")
    if not is_ninja_available():
        raise NativeBuildError("backend='native' compiles a C++ extension on first use with ninja, which was not "
                               "found: pip install ninja; or use backend='torch'")


# ----------------------------------------------------------------------------------------------------------------------
# the JIT cache: one folder per build key, a stamp for finished builds, a lock that dies with its holder
# ----------------------------------------------------------------------------------------------------------------------
# Bump when the build recipe changes in a way the key's other ingredients do not show (torch.utils.cpp_extension's
# own flags are covered by torch's version).
KEY_VERSION = 1
STAMP = "minillm_fast_build.json"  # written next to the library once a build has finished
BUILD_LOCK = "minillm_fast.flock"  # held (fcntl.flock) while a process builds in the folder
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton: a file whose mere presence blocks every loader


def toolchain_settings() -> dict:
    """The key's ingredients that do not depend on the extension: torch, Python, platform, compiler name."""
    return {"key_version": KEY_VERSION, "torch": torch.__version__,
            "torch_git": getattr(torch.version, "git_version", None),
            "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False)),
            "python": f"{sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')}",
            "platform": f"{sys.platform}-{platform.machine()}", "cxx": os.environ.get("CXX", "c++")}


def content_key(src: Path, files, settings: dict) -> str:
    """12 hex digits of sha256 over ``settings`` and the name and bytes of each of ``files`` (relative to src)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        data = (Path(src) / f).read_bytes()
        h.update(f"\0{f}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:12]


def build_settings(cap: str) -> dict:
    return dict(toolchain_settings(), capability=cap, cflags=cflags(cap), ldflags=list(LDFLAGS))


def build_name(cap: str, src: Optional[Path] = None) -> str:
    """``minillm_fast_native_<isa>_<key>``: the JIT build's module and folder name for the sources in ``src``
    (default :func:`source_dir`) built for ``cap`` with this torch."""
    src = source_dir() if src is None else Path(src)
    return f"minillm_fast{module_name(cap)}_{content_key(src, SOURCES + HEADERS, build_settings(cap))}"


def build_dir(name: str) -> Path:
    """Where torch builds the extension ``name`` (created): ``TORCH_EXTENSIONS_DIR/name``, else under torch's default
    root ``~/.cache/torch_extensions/py<XY>_<cpu|cuXYZ>``."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except ImportError:  # private helper moved: torch's documented layout
        from torch.utils.cpp_extension import get_default_build_root

        root = os.environ.get("TORCH_EXTENSIONS_DIR")
        if root is None:
            acc = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
            root = os.path.join(get_default_build_root(),
                                f"py{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}_{acc}")
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def _library(name: str, folder: Path) -> Path:
    return folder / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"


def _stamp_matches(name: str, folder: Path) -> bool:
    """Whether ``folder`` holds a finished build of ``name``: the stamp names it and the library is the one built."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
        st = _library(name, folder).stat()
    except (OSError, ValueError):
        return False
    return (isinstance(stamp, dict) and stamp.get("name") == name and stamp.get("size") == st.st_size
            and stamp.get("mtime_ns") == st.st_mtime_ns)


def _write_stamp(name: str, folder: Path, info: dict) -> None:
    st = _library(name, folder).stat()
    tmp = folder / f"{STAMP}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(dict(info, name=name, size=st.st_size, mtime_ns=st.st_mtime_ns), indent=1,
                              sort_keys=True))
    os.replace(tmp, folder / STAMP)


def _import_library(name: str, path: Path):
    """Import a built extension module from its file, as torch.utils.cpp_extension does (no lock, no ninja)."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _build_lock(folder: Path, what: str):
    """Hold ``folder/minillm_fast.flock`` exclusively (waiting, and saying so, while another process builds); yields
    whether it is held (False where flock is unavailable: Windows, some network filesystems)."""
    if fcntl is None:
        yield False
        return
    fd = os.open(folder / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            print(f"minillm-fast: waiting for another process to finish building {what} in {folder}...",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = True
        except OSError:  # no locks on this filesystem
            held = False
        yield held
    finally:
        os.close(fd)  # releases the lock


def load_keyed(name: str, folder: Path, build: Callable[[], object], what: str, eta: str, info: dict):
    """The extension module ``name`` built in ``folder``: imported directly when a finished build is there (no lock
    taken), else built by ``build()`` (torch's ``load`` with ``build_directory=folder``) under the build lock,
    announcing where, then stamped with ``info``. Shared with native_cuda.py."""
    failed = None
    if _stamp_matches(name, folder):
        try:
            return _import_library(name, _library(name, folder))
        except ImportError as e:  # a damaged library: relinked below
            failed = e
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder, what) as exclusive:
        if failed is None and _stamp_matches(name, folder):  # built by the process this one waited for
            return _import_library(name, _library(name, folder))
        torch_lock = folder / TORCH_LOCK
        if torch_lock.exists():
            if exclusive:  # every minillm-fast build holds the flock, so nobody alive holds torch's lock
                print(f"minillm-fast: removing the stale lock {torch_lock} (left by a process killed while it built "
                      "or loaded the extension; no process is building there now)", file=sys.stderr, flush=True)
                with contextlib.suppress(FileNotFoundError):
                    torch_lock.unlink()
            else:
                print(f"minillm-fast: torch's build lock {torch_lock} exists, and torch waits until it is gone: if no "
                      "other process is building there (a killed build leaves it behind), delete that file",
                      file=sys.stderr, flush=True)
        for p in [folder / STAMP] + ([_library(name, folder)] if failed is not None else []):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        why = f" (the cached library did not import: {failed})" if failed is not None else ""
        print(f"minillm-fast: compiling {what} into {folder}{why} (first use of these sources with this torch; "
              f"{eta})...", file=sys.stderr, flush=True)
        mod = build()
        _write_stamp(name, folder, info)
        return mod


def _jit_build(cap: str, src: Optional[Path] = None):
    """The JIT extension of the sources in ``src`` (default :func:`source_dir`), built if no finished build of them
    is cached."""
    from torch.utils.cpp_extension import load as cpp_load

    _check_toolchain()
    src = source_dir() if src is None else Path(src)
    name = folder = None

    def build():  # fresh lists: torch appends its own -L / -l flags to extra_ldflags (which would change the key)
        return cpp_load(name=name, sources=[str(src / s) for s in SOURCES], extra_cflags=cflags(cap),
                        extra_ldflags=list(LDFLAGS), build_directory=str(folder), verbose=False)

    try:
        name = build_name(cap, src)
        folder = build_dir(name)
        return load_keyed(name, folder, build, f"the native extension ({cap})", "1-3 min",
                          dict(build_settings(cap), sources=str(src)))
    except Exception as e:  # compiler errors come back as RuntimeError / CalledProcessError with the log
        where = f" in {folder}" if folder else ""
        raise NativeBuildError(f"building the native extension ({cap}) from {src}{where} failed: {e}\nUse "
                               "backend='torch' meanwhile; MINILLM_FAST_BACKEND=torch makes it the default.") from e


def _import_prebuilt(cap: str):
    """The module setup.py built ahead of time for ``cap``, or None."""
    try:
        return importlib.import_module(f"minillm_fast.{module_name(cap)}")
    except ImportError:
        return None


# The module once loaded in this process. Loading the extension a second time (after the cache below is cleared,
# as tests do to fake a missing toolchain) could dlopen another build of it, whose torch.library ops would be
# registered twice: a fatal error, not an exception. So a module that loaded is kept for the process's lifetime.
_MODULE = None


@functools.lru_cache(maxsize=None)
def _load():
    """The extension module, or the NativeBuildError saying why there is none (tried once per process)."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    cap = capability()
    mod = _import_prebuilt(cap)
    if mod is None:
        try:
            mod = _jit_build(cap)
        except NativeBuildError as e:
            return e
    _MODULE = mod
    return mod


def load():
    """The compiled extension (building it on first use); raises NativeBuildError if it cannot be had."""
    mod = _load()
    if isinstance(mod, NativeBuildError):
        raise mod
    return mod


# A constant to torch.compile: backend resolution calls this while dynamo traces a model, which must not trace into the
# loader (it queries the CPU capability, a torch.* call that returns a str, and breaks a fullgraph trace).
@torch.compiler.assume_constant_result
def is_available() -> bool:
    return not isinstance(_load(), NativeBuildError)


def build_error() -> Optional[str]:
    mod = _load()
    return str(mod) if isinstance(mod, NativeBuildError) else None


def ops():
    """``torch.ops.minillm_fast_native``: the row kernels of the fused divergence, token log-probs, rollout
    statistics and sampler, and ``capability()`` (registered with torch.library when the extension loads; building it
    on first use)."""
    load()
    return getattr(torch.ops, OPS_NAMESPACE)
