"""The implementations behind the ops, one module per backend, each exporting ``OPS = {op: function}`` with the same
signatures (minillm_fast/dispatch.py chooses among them; nothing else imports them):

* ``torch``: token chunks in plain PyTorch (memory O(chunk x V)); the reference-grade fallback on any device;
* ``native``: the same token chunks, each chunk's row work in the C++ extension of csrc/ (CPU);
* ``triton``: the Triton kernels of kernels/ (CUDA; CPU under TRITON_INTERPRET=1), the only module that imports them.
"""
