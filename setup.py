"""Packaging for minillm-fast.

The Triton kernels live in the top-level folder ``kernels/`` but are installed as ``minillm_fast.kernels``: a
top-level module called ``kernels`` would shadow the Hugging Face ``kernels`` package that transformers probes for.
The C++ sources of ``csrc/`` ship as package data (``minillm_fast/csrc``); ``backend="native"`` compiles them on
first use (minillm_fast/native.py), so by default nothing here needs a compiler or a GPU.

``MINILLM_FAST_BUILD_EXT=1`` compiles the native extension now instead, one module per CPU instruction set
(``minillm_fast._native_default``, ``_native_avx2``, ``_native_avx512`` on x86-64; native.py imports the one that
matches the machine at run time). It needs torch and a C++ compiler in the build environment::

    MINILLM_FAST_BUILD_EXT=1 pip install --no-build-isolation .
"""
import importlib.util
import os
import platform
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _native_extensions():
    """(ext_modules, cmdclass) of the ahead-of-time build, with native.py's sources and flags."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    spec = importlib.util.spec_from_file_location("_minillm_fast_native_build", HERE / "minillm_fast" / "native.py")
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    caps = ("DEFAULT", "AVX2", "AVX512") if x86 else ("DEFAULT",)
    exts = [CppExtension(f"minillm_fast.{native.module_name(cap)}", [f"csrc/{s}" for s in native.SOURCES],
                         extra_compile_args=native.cflags(cap), extra_link_args=native.LDFLAGS) for cap in caps]

    class BuildPerCapability(BuildExtension):
        """The variants compile the same source with different flags: a temp folder each, so no object is reused."""

        def build_extension(self, ext):
            temp = self.build_temp
            self.build_temp = os.path.join(temp, ext.name)
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = temp

    return exts, {"build_ext": BuildPerCapability}


ext_modules, cmdclass = _native_extensions() if os.environ.get("MINILLM_FAST_BUILD_EXT") == "1" else ([], {})

setup(
    packages=find_packages(include=["minillm_fast", "minillm_fast.*"]) + ["minillm_fast.kernels", "minillm_fast.csrc"],
    package_dir={"minillm_fast": "minillm_fast", "minillm_fast.kernels": "kernels", "minillm_fast.csrc": "csrc"},
    package_data={"minillm_fast.csrc": ["*.cpp", "*.cu", "*.h", "cuda/*.cpp", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
