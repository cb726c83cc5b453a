"""A guard for the render path on Apple MPS: inside `no_float64_or_cuda()`, any torch op that takes
or makes a float64 tensor, or a tensor on a CUDA device, fails the test, and so does any call that
initialises CUDA (every `torch.cuda` call that needs the driver goes through `_lazy_init`). MPS has
no float64 and no CUDA, so a CPU render that passes this guard has neither on its path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class ForbiddenOnMps(AssertionError):
    pass


def _check(op: object, values: object) -> None:
    for value in tree_flatten(values)[0]:
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.float64:
                raise ForbiddenOnMps(f"{op} used a float64 tensor (MPS has no float64)")
            if value.device.type == "cuda":
                raise ForbiddenOnMps(f"{op} used a CUDA tensor")
        elif isinstance(value, torch.device) and value.type == "cuda":
            raise ForbiddenOnMps(f"{op} was given a CUDA device")
        elif isinstance(value, torch.dtype) and value == torch.float64:
            raise ForbiddenOnMps(f"{op} was asked for float64")


class _DispatchGuard(TorchDispatchMode):
    """Every ATen op: its inputs and outputs (the tensors made inside factories included)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _check(func, (args, kwargs))
        out = func(*args, **kwargs)
        _check(func, out)
        return out


class _FunctionGuard(TorchFunctionMode):
    """Python-level torch calls: catches `device="cuda"` / `dtype=float64` arguments before dispatch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _check(func, (args, kwargs))
        return func(*args, **kwargs)


def _refuse_cuda_init(*_args, **_kwargs):
    raise ForbiddenOnMps("CUDA was initialised (a torch.cuda call on the render path)")


@contextlib.contextmanager
def no_float64_or_cuda() -> Iterator[None]:
    original = torch.cuda._lazy_init
    torch.cuda._lazy_init = _refuse_cuda_init
    try:
        with _FunctionGuard(), _DispatchGuard():
            yield
    finally:
        torch.cuda._lazy_init = original
