"""Block swapping: the frozen weights of the last N blocks live in (pinned) host memory and are
copied to the GPU on a side stream just before the block runs, one block ahead.

Written here rather than with diffusers' group offloading because training needs three things it
does not do: LoRA parameters stay resident (they are trained and stepped on the GPU), frozen weights
are never copied back (the host copy is already right; the GPU copy is simply dropped), and the
prefetch follows backward's reverse order when checkpointing recomputes the blocks.

Mechanics: forward pre-hooks on every block put the GPU copies into the swapped block's modules
(waiting for their copy) and start copying the next block in execution order; forward post-hooks
put the host copies back. Autograd keeps the GPU copies it saved alive until the block's backward
is done, so a block's weights are freed as soon as nothing needs them. Works on any tensor
subclass that flattens into plain tensors (quanto and torchao quantized weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import _disable_current_modes

from ..pinned_memory import PinnedArena


def _map_tensor(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply `fn` to each plain tensor inside a (possibly nested) wrapper subclass and rebuild it, so
    quantized weights keep their packing (int4 packs for the device it was quantized on)."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return fn(tensor.data if isinstance(tensor, nn.Parameter) else tensor)
    names, context = tensor.__tensor_flatten__()
    inner = {name: _map_tensor(getattr(tensor, name), fn) for name in names}
    return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensor(tensor, lambda t: found.append(t) or t)
    return found


def _as_entry(tensor: torch.Tensor, is_parameter: bool) -> torch.Tensor:
    if is_parameter and type(tensor) is torch.Tensor:  # a plain tensor, not yet a Parameter
        return nn.Parameter(tensor, requires_grad=False)
    return tensor  # quantized subclasses are registered as they are (quanto/torchao do the same)


@dataclass
class _Slot:
    """One frozen tensor of a swapped block: where it is registered and its host copy."""

    owner: nn.Module
    name: str
    is_parameter: bool
    host: torch.Tensor

    def install(self, tensor: torch.Tensor) -> None:
        table = self.owner._parameters if self.is_parameter else self.owner._buffers
        table[self.name] = _as_entry(tensor, self.is_parameter)


@dataclass
class _SwappedBlock:
    slots: list[_Slot]
    on_device: list[torch.Tensor] | None = None
    ready: torch.cuda.Event | None = None
    installed: bool = False


@dataclass
class BlockSwap:
    """Handle returned by `enable_block_swap`; `transfers` counts host→device block copies."""

    device: torch.device
    offload_device: torch.device
    swapped: dict[int, _SwappedBlock]
    num_blocks: int
    hooks: list = field(default_factory=list)
    stream: torch.cuda.Stream | None = None
    transfers: int = 0
    host_arena: PinnedArena | None = None  # the pinned host copies (their size is `reserved_bytes`)

    # ----- copies ------------------------------------------------------------------------------
    def prefetch(self, index: int) -> None:
        entry = self.swapped.get(index)
        if entry is None or entry.on_device is not None:
            return
        copy = lambda t: t.to(self.device, non_blocking=True, copy=True)  # noqa: E731
        if self.stream is None:
            entry.on_device = [_map_tensor(slot.host, copy) for slot in entry.slots]
        else:
            with torch.cuda.stream(self.stream):
                entry.on_device = [_map_tensor(slot.host, copy) for slot in entry.slots]
                entry.ready = torch.cuda.Event()
                entry.ready.record(self.stream)
        self.transfers += 1

    def _install(self, index: int) -> None:
        entry = self.swapped[index]
        if entry.installed:
            return
        self.prefetch(index)  # no-op when the previous block already started it
        if entry.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(entry.ready)
            for tensor in entry.on_device:
                for plain in _plain_tensors(tensor):
                    plain.record_stream(current)  # allocated on the side stream, used on this one
            entry.ready = None
        for slot, tensor in zip(entry.slots, entry.on_device):
            slot.install(tensor)
        entry.installed = True

    def _drop(self, index: int) -> None:
        entry = self.swapped[index]
        for slot in entry.slots:
            slot.install(slot.host)
        entry.on_device = None
        entry.installed = False

    # ----- hooks -------------------------------------------------------------------------------
    @staticmethod
    def _in_backward() -> bool:
        # checkpointing recomputes blocks inside the autograd engine, in reverse order
        return torch._C._current_graph_task_id() != -1

    def _before(self, index: int) -> None:
        # The hooks run inside the block's checkpointed region. Selective checkpointing records every
        # op there and expects the same ops when it recomputes; weight copies differ between forward
        # and backward order, so they run with the dispatch modes (the recorder) switched off.
        with _disable_current_modes():
            self._before_unrecorded(index)

    def _before_unrecorded(self, index: int) -> None:
        step = -1 if self._in_backward() else 1
        # Checkpointing's recompute stops as soon as it has what backward needs, so a recomputed
        # block's post-hook may never run: drop every other block's copies here instead.
        for other, entry in self.swapped.items():
            if other not in (index, index + step) and entry.on_device is not None:
                self._drop(other)
        if index in self.swapped:
            self._install(index)
        if 0 <= index + step < self.num_blocks:
            self.prefetch(index + step)

    def _after(self, index: int) -> None:
        if index not in self.swapped:
            return
        last_in_forward = index == self.num_blocks - 1
        if last_in_forward and torch.is_grad_enabled() and not self._in_backward():
            return  # backward recomputes this block first: keep it instead of fetching it again
        with _disable_current_modes():
            self._drop(index)

    def remove(self) -> None:
        """Remove the hooks and put every swapped block's weights back on `device`."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        for entry in self.swapped.values():
            for slot in entry.slots:
                slot.install(_map_tensor(slot.host, lambda t: t.to(self.device, copy=True)))
        self.swapped = {}


def _frozen_slots(block: nn.Module) -> list[_Slot]:
    slots = []
    for module in block.modules():
        for name, param in module._parameters.items():
            if param is not None and not param.requires_grad:
                slots.append(_Slot(module, name, True, param))
        for name, buffer in module._buffers.items():
            if buffer is not None:
                slots.append(_Slot(module, name, False, buffer))
    return slots


def enable_block_swap(
    model: nn.Module, num_blocks: int, device: str | torch.device = "cuda", offload_device: str | torch.device = "cpu",
) -> BlockSwap:
    """Place `model` for training with the frozen weights of its last `num_blocks` blocks in host
    memory: everything else (embedders, resident blocks, every trainable parameter) moves to
    `device`. Call after `add_lora` (LoRA parameters must exist to stay resident) and after
    quantizing, and keep Accelerate from moving the model again
    (`accelerator.prepare(..., device_placement=[False, ...])`).

    Swapping saves memory only with activation checkpointing: without it autograd keeps every
    block's GPU weights until backward."""
    blocks = model.blocks
    if not 0 < num_blocks <= len(blocks):
        raise ValueError(f"musubi_blocks_to_swap={num_blocks}: choose 1..{len(blocks)} (the model has {len(blocks)} blocks)")
    device, offload_device = torch.device(device), torch.device(offload_device)
    pin = device.type == "cuda" and offload_device.type == "cpu"
    first_swapped = len(blocks) - num_blocks
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for index, block in enumerate(blocks):
        if index < first_swapped:
            block.to(device)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(device)  # identity kept: the optimizer may already hold it

    swapped = {}
    arena = PinnedArena()  # exact sizes: pin_memory() would round each weight up to a power of two

    def to_host(t: torch.Tensor) -> torch.Tensor:
        if pin and t.is_contiguous():
            return arena.empty(t.shape, t.dtype).copy_(t)
        host = t.to(offload_device, copy=True)
        return host.pin_memory() if pin else host

    for index in range(first_swapped, len(blocks)):
        slots = _frozen_slots(blocks[index])
        for slot in slots:
            host = _map_tensor(slot.host, to_host)
            slot.host = _as_entry(host, slot.is_parameter)  # wrapped once: reinstalling it allocates nothing
            slot.install(slot.host)
            # Autograd code that holds a weight outside its saved tensors would keep this block's
            # temporary GPU copy alive until backward; such code checks the flag (lora.fused_linear).
            slot.owner.weights_swapped = True
        swapped[index] = _SwappedBlock(slots)

    swap = BlockSwap(device, offload_device, swapped, len(blocks),
                     stream=torch.cuda.Stream(device) if device.type == "cuda" else None, host_arena=arena)
    for index, block in enumerate(blocks):
        swap.hooks.append(block.register_forward_pre_hook(lambda _m, _a, i=index: swap._before(i)))
        swap.hooks.append(block.register_forward_hook(lambda _m, _a, _o, i=index: swap._after(i)))
    model._block_swap = swap  # lets group offloading refuse to stack on top of it
    return swap
