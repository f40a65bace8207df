"""A source checkout works as an install does, and the suite notices a backend that silently went missing."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

from helpers import IMPLS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_import_from_a_plain_checkout():
    """With the editable install's import hook removed (as in a clone used through PYTHONPATH), the Triton kernels
    still import as ``minillm_fast.kernels`` (from the top-level kernels/) and the triton backend resolves."""
    code = textwrap.dedent("""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        for name in [m for m in sys.modules if m.startswith("__editable__") or m.startswith("minillm_fast")]:
            del sys.modules[name]
        import minillm_fast, minillm_fast.kernels.configs as configs
        assert configs.__file__.endswith("kernels/configs.py"), configs.__file__
        print(minillm_fast.dispatch.resolve("triton", __import__("torch").device("cpu")))
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "triton", res.stderr[-3000:]


def test_every_backend_that_can_run_is_tested():
    """IMPLS (the backends the numeric tests run on) is built from minillm_fast.dispatch.resolve, which swallows a
    backend that fails to import. Check it against what is installed instead, so that a broken import fails here
    rather than quietly shrinking the suite."""
    names = {backend for backend, _ in IMPLS}
    assert "torch" in names
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
        assert {("triton", "chunked"), ("triton", "tiled")} <= set(IMPLS), IMPLS
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if sys.platform.startswith("linux") and importlib.util.find_spec("ninja") is not None and compiler:
        assert "native" in names, IMPLS
