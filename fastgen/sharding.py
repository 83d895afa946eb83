"""FSDP2 sharding of a run's networks (``train.sharding: fsdp2``), on torch's own ``fully_shard``.

Each network is sharded block by block, then as a whole (Zhao et al. 2023, "PyTorch FSDP"; torch's FSDP2 API):
every parameter becomes a ``DTensor`` sharded on dim 0 over the processes, gathered one block at a time for its
forward and backward; gradients are reduce-scattered. The trainer shards, in this order, once every network
exists (``build_run``'s ``shard`` hook) and before any optimizer or EMA is made: the frozen teacher (the base
that LoRA fake scores share with it, adapters included: every adapter must exist before its base is sharded),
each student (each expert), the objective's networks (fake scores, discriminator heads) and the frozen copies the
objective keeps (an EMA target). Measured facts this design rests on are in docs/fsdp2_findings.md (gloo, two
CPU processes): losses and gradients equal a replicated run to ~1e-7, phase ownership by ``requires_grad``
toggling reduces only the owned networks' gradients, adapters switch per call on a sharded base.

accelerate stays for what it does well (process group, autocast, trackers, ``reduce``); sharded modules are
never passed to ``accelerate.prepare`` (its DDP wrapper cannot broadcast DTensors).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

BLOCK_ATTRIBUTES = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks",
                    "blocks", "layers")
"""Attributes that hold a diffusers network's blocks: UNets' ``down_blocks``, ``mid_block``, ``up_blocks``;
transformers' ``transformer_blocks`` (SD3, Flux, SANA, Qwen-Image), ``single_transformer_blocks`` (Flux) and
``blocks`` (Wan); ``layers`` of text-encoder-like stacks. A list is sharded item by item."""


def process_mesh(device: torch.device):
    """The one-dimensional device mesh over every process of the run. A run of one process forms a group of
    its own first (an in-memory store), so that one code path serves one process and many."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("gloo" if device.type == "cpu" else "cpu:gloo,cuda:nccl", store=dist.HashStore(),
                                rank=0, world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),))


BLOCK_PARTS = ("resnets", "attentions")
"""Inside a UNet's block, the lists whose items are sharded one by one before the block: its resnets and its
attention modules. A UNet's blocks are few and large (SDXL's ``up_blocks[0]`` holds 1.21 B of its 2.57 B
parameters), and a block is gathered whole for its compute; its parts are a fraction of it."""


def blocks(model: nn.Module, attributes: Iterable[str] | None = None) -> list[nn.Module]:
    """The units of ``model`` sharded one by one before it, in order: the modules under ``attributes`` (default
    ``BLOCK_ATTRIBUTES``) that hold parameters, a ``ModuleList``'s items one by one, each block preceded by the
    items of its ``BLOCK_PARTS`` (a block's own unit then holds what its parts do not: a down- or up-sampler)."""
    found = []
    for name in BLOCK_ATTRIBUTES if attributes is None else attributes:
        for block in _items(getattr(model, name, None)):
            found += [part for part_list in BLOCK_PARTS for part in _items(getattr(block, part_list, None))]
            found.append(block)
    return found


def _items(value) -> list[nn.Module]:
    """The modules holding parameters in ``value``: a list's items, or ``value`` itself."""
    items = list(value) if isinstance(value, (nn.ModuleList, nn.Sequential)) else [value]
    return [m for m in items if isinstance(m, nn.Module) and any(True for _ in m.parameters())]


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard(module: nn.Module, mesh, *, block_attributes: Iterable[str] | None = None,
          reshard_after_forward: bool = True, offload: bool = False) -> nn.Module:
    """``fully_shard`` each of ``module``'s units (``blocks``), then ``module`` (in place; a module already sharded or
    without parameters is left as it is). ``offload``: the shards live in CPU memory (``CPUOffloadPolicy``).

    Parameters are gathered in the dtype they are held in (a half-precision teacher's in its own, trained
    weights in float32) and computed under the trainer's autocast, as an unsharded run does: FSDP2's
    ``MixedPrecisionPolicy`` is not used (with trained float32 weights under bf16 autocast it failed at the first
    backward on this torch, 2.14: a bf16 gradient assigned to a float32 one). Its cost: trained networks are
    gathered in float32, twice the bytes of a bf16 gather."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if is_sharded(module) or not any(True for _ in module.parameters()):
        return module
    # None is FSDP2's own default: reshard every block but the root, whose parameters the backward needs at once
    # (and also where only an inner block's output reaches the loss: a discriminator on a bottleneck feature)
    kwargs = {"mesh": mesh, "reshard_after_forward": None if reshard_after_forward else False,
              "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    for block in blocks(module, block_attributes):
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return module


def network_roots(module: nn.Module) -> list[nn.Module]:
    """The networks inside ``module``: ``module`` itself, or for one of fastgen's denoiser wrappers (which hold
    a network and a schedule) the networks of its children."""
    from fastgen.denoiser import BaseDenoiser

    if not isinstance(module, BaseDenoiser):
        return [module]
    return [root for child in module.children() for root in network_roots(child)]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a ``DTensor`` (a collective: every process calls it); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
