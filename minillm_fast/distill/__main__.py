"""``python -m minillm_fast.distill --config run.yaml [key=value ...]`` (also under torchrun)."""
import sys

from .cli import distill_main

sys.exit(distill_main())
