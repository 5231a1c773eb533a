"""Plain eager calls skip the custom-op dispatcher.

Each op family registers its launcher as a ``torch.library`` custom op: the op is what ``torch.compile``,
fake tensors, dispatch modes (``FlopCounterMode``, ...) and functorch transforms see. In a plain eager call
the dispatcher adds only host time (its Python and C++ crossings and output checks: 45 us for the forward,
80-220 us for the backward on the autograd engine's thread, measured on an H200's host), so there the
launcher runs directly.

Every op runs on the device of its first argument, as a CUDA op does under its device guard: Triton launches on
the current device and its current stream, so a call whose tensors sit on another GPU (a model spread over
several GPUs without ``torch.cuda.set_device``) sets the current device to theirs for the call and back after.
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def direct(*args) -> bool:
    """Whether a call with these arguments may run the launcher itself: eager (not traced by dynamo), no
    functorch transform or dispatch mode active, every tensor argument a plain ``torch.Tensor``."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) is not torch.Tensor:
            return False
    return True


_several_gpus: bool | None = None  # more than one CUDA device visible; found at the first CUDA call


def _several_gpus_visible() -> bool:
    global _several_gpus
    if _several_gpus is None:
        _several_gpus = torch.cuda.device_count() > 1
    return _several_gpus


def on_first_device(fn):
    """``fn`` run with the current CUDA device set to that of its first argument (a tensor) where the two
    differ; calls on the current device, on a machine of one GPU, and on CPU tensors take ``fn`` as it is.
    The check adds 0.13 us a call with one GPU visible, 0.5 us with several (an H200 host)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = args[0]
        if first.is_cuda and (_several_gpus or _several_gpus is None and _several_gpus_visible()):
            index = first.get_device()
            if index != torch.cuda.current_device():
                with torch.cuda.device(index):
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


class EagerOp:
    """A ``torch.library`` custom op (``op``) over the function ``fn``; a call runs ``fn`` itself where
    ``direct`` allows it, else the op. Either way ``fn`` runs on its first argument's device
    (``on_first_device``)."""

    def __init__(self, name: str, fn, mutates_args=()):
        self.fn = on_first_device(fn)
        # The schema from fn itself (its annotations resolve in its own module), the op running the guarded fn.
        self.op = torch.library.custom_op(name, self.fn, mutates_args=mutates_args,
                                          schema=torch.library.infer_schema(fn, mutates_args=mutates_args))

    def __call__(self, *args):
        return self.fn(*args) if direct(*args) else self.op(*args)

    def register_fake(self, fake):
        return self.op.register_fake(fake)
