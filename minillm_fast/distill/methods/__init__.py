"""The training methods, one module each; importing this package registers them all in
:data:`minillm_fast.distill.base.METHODS` (``minillm_fast.distill.trainer`` does, for every user of the trainer).

``lm`` (sft, kd: cross-entropy and forward KL on the training responses), ``seqkd`` (the same on teacher-generated
responses), ``minillm`` (policy-gradient reverse KL on teacher-mixed rollouts), ``okd`` (online KD: the teacher's
LoRA module trained with the student). Each is a :class:`~minillm_fast.distill.base.Method`; they import the base,
never the reverse.
"""
from . import lm, minillm, okd, seqkd

__all__ = ["lm", "minillm", "okd", "seqkd"]
