"""``python -m minillm_fast.distill --config run.yaml [key=value ...]`` (also under torchrun): ``minillm-fast distill``."""
import sys

from ..cli import main

sys.exit(main(["distill", *sys.argv[1:]]))
