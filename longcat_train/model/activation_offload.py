"""Keep large tensors held for backward in pinned host memory during the forward/backward gap.

Two kinds, both grouped per transformer block and brought back one block ahead of backward:

* Checkpointed block inputs. Non-reentrant checkpointing saves each block's inputs through
  autograd's saved-tensor hooks, outside the block's own recomputation hooks, so a
  `saved_tensors_hooks` context around the block loop sees exactly those inputs.
* Kept attention outputs (selective checkpointing). Selective checkpointing caches them inside
  PyTorch's checkpoint machinery, beyond the reach of saved-tensor hooks, so `keep_on_host` moves
  their *storage* instead: once the block's forward is done the bytes go to the host and the GPU
  storage is resized to zero; it is re-allocated and refilled before the block is recomputed. The
  cached tensor object never changes, so checkpointing sees the same tensor it stored.

At 480x832x93 each is 0.29 GiB per block: 28 GiB of GPU memory idle between forward and backward.

Written here rather than `torch.autograd.graph.save_on_cpu` because that copies synchronously on the
compute stream in both directions and cannot reach selective checkpointing's cache; this copies on a
side stream and fetches the next block's tensors while the current block's backward runs.

Host copies come from one pinned arena, rewound at each forward once no earlier graph holds host
copies (a second forward before the first one's backward gets fresh bytes): every step offloads the
same sizes, so after the first step no pinned memory is allocated, and none is lost to rounding.
Reuse is safe because all copies run on one side stream per device, in order: a step's copies out
are queued after the previous step's copies back.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

from ..pinned_memory import PinnedArena

HOST_ARENA = PinnedArena()
_side_streams: dict[torch.device, torch.cuda.Stream] = {}
# states whose graph is alive (autograd holds their unpack hooks until backward frees it)
_live_states: "weakref.WeakSet[_OffloadState]" = weakref.WeakSet()


class _Offloaded:
    """A checkpointed block input living on the host."""

    __slots__ = ("host", "device", "copied_out", "on_device", "copied_in", "group")

    def __init__(self, host: torch.Tensor, device: torch.device, copied_out: torch.cuda.Event, group: int):
        self.host = host
        self.device = device
        self.copied_out = copied_out
        self.on_device: torch.Tensor | None = None
        self.copied_in: torch.cuda.Event | None = None
        self.group = group


class _StashedStorage:
    """A kept tensor whose GPU storage is emptied until its block is recomputed (bytes on the host)."""

    __slots__ = ("tensor", "host", "copied_out", "copied_in")

    def __init__(self, tensor: torch.Tensor, host: torch.Tensor, copied_out: torch.cuda.Event):
        self.tensor = tensor
        self.host = host
        self.copied_out = copied_out
        self.copied_in: torch.cuda.Event | None = None


def _storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A fresh uint8 tensor over all of `tensor`'s storage: copies through it move the bytes
    whatever the tensor's strides, and leave the tensor's own version counter alone (checkpointing
    checks that its cached tensors were not modified)."""
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage, 0, (storage.nbytes(),))


class _OffloadState:
    """What the hooks share. It holds no reference to the hooks, so no reference cycle keeps the
    pinned copies alive (and un-reusable by the host cache) after backward has freed the graph."""

    def __init__(self, min_bytes: int):
        self.min_bytes = min_bytes
        self.group = 0
        self.kept: frozenset[str] = frozenset()
        self.inputs: dict[int, list[_Offloaded]] = {}
        self.stashed: dict[int, list[_StashedStorage]] = {}
        self.open_stash: list[_StashedStorage] = []

    @staticmethod
    def _side_stream(device: torch.device) -> torch.cuda.Stream:
        if device not in _side_streams:
            _side_streams[device] = torch.cuda.Stream(device)
        return _side_streams[device]

    def _copy_to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        stream = self._side_stream(tensor.device)
        host = HOST_ARENA.empty(tensor.shape, tensor.dtype)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            copied_out = torch.cuda.Event()
            copied_out.record(stream)
        tensor.record_stream(stream)  # the allocator must not reuse it before the copy ends
        return host, copied_out

    # ----- block boundaries (forward) ----------------------------------------------------------
    def begin_group(self, group: int, kept: frozenset[str]) -> None:
        """Block `group` starts its forward; `kept`: the kinds of outputs selective checkpointing
        really keeps in it (only those may go to the host)."""
        self.release_stash()
        self.group = group
        self.kept = kept

    def release_stash(self) -> None:
        """Free the GPU storage of the tensors kept by the block whose forward just ended."""
        if self.open_stash:
            self.stashed[self.group] = self.open_stash
            for item in self.open_stash:
                item.tensor.untyped_storage().resize_(0)
            self.open_stash = []

    # ----- checkpointed inputs: saved-tensor hooks ---------------------------------------------
    def pack(self, tensor: torch.Tensor):
        if not tensor.is_cuda or tensor.numel() * tensor.element_size() < self.min_bytes or not tensor.is_contiguous():
            return tensor
        host, copied_out = self._copy_to_host(tensor)
        handle = _Offloaded(host, tensor.device, copied_out, self.group)
        self.inputs.setdefault(self.group, []).append(handle)
        return handle

    def unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        # Unpacking a block's input starts its recomputation: this block's tensors are needed now,
        # the previous block's next (backward visits blocks in reverse order).
        self.fetch_group(packed.group)
        self.fetch_group(packed.group - 1)
        current = torch.cuda.current_stream(packed.device)
        current.wait_event(packed.copied_in)
        # Dropped here: from now on checkpointing's own cache is the only holder of the refilled
        # storage, which is then freed as soon as that block's backward has used it.
        for item in self.stashed.pop(packed.group, ()):
            current.wait_event(item.copied_in)
        tensor = packed.on_device
        tensor.record_stream(current)
        packed.on_device = None  # a second unpack (retain_graph) fetches again from the host copy
        return tensor

    # ----- kept outputs ------------------------------------------------------------------------
    def stash(self, tensor: torch.Tensor, kind: str) -> None:
        if kind not in self.kept:
            return
        host, copied_out = self._copy_to_host(_storage_bytes(tensor))
        self.open_stash.append(_StashedStorage(tensor, host, copied_out))

    # ----- backward ----------------------------------------------------------------------------
    def fetch_group(self, group: int) -> None:
        """Start copying a block's offloaded tensors back (no-op for those already on their way)."""
        for handle in self.inputs.get(group, ()):
            if handle.on_device is None:
                stream = self._side_stream(handle.device)
                with torch.cuda.stream(stream):
                    stream.wait_event(handle.copied_out)
                    handle.on_device = handle.host.to(handle.device, non_blocking=True)
                    handle.copied_in = torch.cuda.Event()
                    handle.copied_in.record(stream)
        for item in self.stashed.get(group, ()):
            if item.copied_in is None:
                current = torch.cuda.current_stream(item.tensor.device)
                item.tensor.untyped_storage().resize_(item.host.numel())  # allocated on `current`
                stream = self._side_stream(item.tensor.device)
                stream.wait_stream(current)
                with torch.cuda.stream(stream):
                    stream.wait_event(item.copied_out)
                    _storage_bytes(item.tensor).copy_(item.host, non_blocking=True)
                    item.copied_in = torch.cuda.Event()
                    item.copied_in.record(stream)
                item.tensor.record_stream(stream)


_active: list[_OffloadState] = []


@contextlib.contextmanager
def host_offload(min_bytes: int = 32 * 2**20) -> Iterator[_OffloadState]:
    """Context manager around the block loop: CUDA tensors of at least `min_bytes` saved for
    backward inside it live in pinned host memory until backward needs them (smaller ones, like
    the timestep and text states every block shares, stay where they are), and so do the tensors
    passed to `keep_on_host`. Call `begin_block` as each block starts."""
    state = _OffloadState(min_bytes)
    if not _live_states:
        HOST_ARENA.rewind()
    _live_states.add(state)
    _active.append(state)
    try:
        with torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack):
            yield state
    finally:
        _active.pop()
        state.release_stash()


def begin_block(index: int, kept: frozenset[str]) -> None:
    """Tell the active `host_offload` (if any) that block `index` starts its forward, and which
    kinds of outputs selective checkpointing keeps in it (e.g. {"self_attention"}): `keep_on_host`
    acts on those only."""
    if _active:
        _active[-1].begin_group(index, kept)


def keep_on_host(tensor: torch.Tensor, kind: str) -> None:
    """Move an output that selective checkpointing keeps (`kind`, e.g. "self_attention") to the
    host once the current block's forward is over, and back before its recomputation. No-op
    outside `host_offload` (no offloading, or a recomputation during backward), where this block
    keeps no output of that kind, and for CPU tensors or tensors sharing their storage."""
    if _active and tensor.is_cuda and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        _active[-1].stash(tensor, kind)
