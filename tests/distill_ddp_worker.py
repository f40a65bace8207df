"""One training step of a toy distillation, saving the student's gradients (rank 0) before the optimiser step.

    python tests/distill_ddp_worker.py OUT.pt key=value ...                    # one process
    torchrun --nproc_per_node 2 tests/distill_ddp_worker.py OUT.pt key=value   # DDP (gloo on CPU)
    torchrun ... tests/distill_ddp_worker.py OUT.pt parallel=fsdp key=value    # FSDP: gradients gathered whole

Used by tests/test_distill_train.py (DDP and FSDP against one process).
"""
import os
import sys

import torch

torch.set_num_threads(1)

from minillm_fast.distill import fsdp, ranks  # noqa: E402
from minillm_fast.distill.config import DistillConfig, parse_overrides  # noqa: E402
from minillm_fast.distill.trainer import Trainer  # noqa: E402


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = DistillConfig.from_dict(parse_overrides(overrides))

    def save_grads(trainer):
        if trainer.step > 0:
            return
        # under FSDP p.grad is this rank's shard (a DTensor): every rank joins the gather
        grads = {n: fsdp.full_tensor(p.grad.detach()).clone() for n, p in trainer.student.named_parameters()}
        if trainer.main:
            torch.save(grads, out)

    env = ranks.init("cpu")
    trainer = Trainer(cfg, env=env, hooks={"after_backward": save_grads})
    trainer.train()
    ranks.destroy()
    if env.is_main:
        print(f"world size {env.world_size}: wrote {os.path.basename(out)}")


if __name__ == "__main__":
    main()
