"""Packaging for minillm-fast.

The Triton kernels live in the top-level folder ``kernels/`` but are installed as ``minillm_fast.kernels``: a
top-level module called ``kernels`` would shadow the Hugging Face ``kernels`` package that transformers probes for.
Nothing here needs a compiler or a GPU.
"""
from setuptools import setup

setup(
    packages=["minillm_fast", "minillm_fast.ops", "minillm_fast.kernels"],
    package_dir={"minillm_fast": "minillm_fast", "minillm_fast.kernels": "kernels"},
)
