"""FSDP (``parallel: fsdp``): shard the student and the teacher over the ranks of a torchrun job, for models that do
not fit one device. PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), gloo on CPU and NCCL on CUDA.

How the models are cut, and why:

* Student: one FSDP group per transformer block (the classes in the model's ``_no_split_modules``), and a root group
  on the :class:`~minillm_fast.distill.models.HiddenStates` wrapper holding what is left (embeddings, final norm,
  lm_head). The fused losses take the head's weight as an argument instead of calling the lm_head inside the
  forward, so the trainer unshards the root group (:func:`gather_root`) before it reads the weight; FSDP keeps the
  root unsharded after a forward (it is all-gathered again for the backward anyway), and its backward reduce-scatters
  the head's gradient with the rest of the root group. Gradients are averaged over ranks, as under DDP, so the loss
  scaling of the trainer (``world_size / global tokens``) is the same for both.
* Teacher (no gradients): one group per block, resharded after each forward; its embeddings, final norm and head
  stay whole on every rank, because the fused ops and the rollout loop read the head weight directly and the
  teacher's blocks are where its size is.
* Rollouts and evaluation call the student's base model directly (with KV caches); blocks all-gather themselves in
  their forward hooks, the root group is unsharded by :func:`gather_root` first. Decoding then all-gathers every
  block once per generated token, so rollouts are communication-bound under FSDP: use DDP when a model fits.

Checkpoints gather full (unsharded) state dicts on every rank (``torch.distributed.checkpoint.state_dict``, CPU
offload), so a checkpoint written under FSDP is an ordinary one: it resumes under FSDP, DDP or one process.
Limitation: each rank first loads the whole checkpoint of both models into CPU memory, then shards them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError as e:   # torch < 2.6
        raise RuntimeError(f"parallel=fsdp needs torch.distributed.fsdp.fully_shard (PyTorch >= 2.6): {e}") from None
    return FSDPModule, fully_shard


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model: instances of the classes in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise RuntimeError(f"parallel=fsdp: cannot find the transformer blocks of {type(model).__name__} (its "
                           f"_no_split_modules is {sorted(names) or 'empty'}); use parallel=ddp")
    return found


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))


def shard_student(wrapper: nn.Module, device: torch.device) -> nn.Module:
    """Shard a :class:`HiddenStates` wrapper in place (blocks, then the root) and run one tiny forward through it, so
    the wrapper is FSDP's root before anything calls a block directly (rollouts do). Returns the wrapper, resharded:
    build the optimiser after this, on ``wrapper.model.parameters()`` (the sharded DTensors)."""
    _, fully_shard = _fsdp()
    mesh = _mesh(device)
    for block in blocks(wrapper.model):
        fully_shard(block, mesh=mesh)
    fully_shard(wrapper, mesh=mesh)
    with torch.no_grad():
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        wrapper(ids, torch.ones_like(ids))
    # the root stays unsharded after a forward; the optimiser must be built on the sharded parameters
    reshard(wrapper)
    return wrapper


def shard_teacher(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard the teacher's blocks in place (each resharded after its forward); the rest stays whole."""
    _, fully_shard = _fsdp()
    mesh = _mesh(device)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    return model


def is_sharded(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def gather_root(module: nn.Module) -> None:
    """All-gather the root group of a sharded student (no-op when it is already whole, or not sharded)."""
    if is_sharded(module):
        module.unshard()


@contextlib.contextmanager
def no_gradient_sync(module: nn.Module, active: bool) -> Iterator[None]:
    """FSDP's counterpart of DDP's ``no_sync``: accumulate local gradients, reduce-scatter on the last micro-batch."""
    if not active:
        yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call it), other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def reshard(root: nn.Module) -> None:
    """Put every group of ``root`` back in its sharded form: the parameters the optimiser holds are the sharded
    ones, and state-dict helpers match the two by identity (the root group stays unsharded after a forward or a
    :func:`gather_root`)."""
    for m in root.modules():
        if is_sharded(m):
            m.reshard()


def full_model_state(root: nn.Module, model: nn.Module) -> dict:
    """The unsharded state dict of ``model`` (inside the sharded ``root``) on CPU; a collective, every rank gets it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(root)
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(root: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(root)
    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_state(root: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load full state dicts (every rank holds them) into the sharded model and its optimiser."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    reshard(root)
    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())
