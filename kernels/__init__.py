"""Triton kernels, installed as ``minillm_fast.kernels`` (one file per op family).

Importing this package needs Triton; ``minillm_fast.backends`` imports it lazily so that the torch backend works
without Triton installed. Kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set before
the first import (that is how the test suite runs them on machines without a GPU).
"""
