"""Plain eager calls skip the custom-op dispatcher.

Each op family registers its launcher as a ``torch.library`` custom op: the op is what ``torch.compile``,
fake tensors, dispatch modes (``FlopCounterMode``, ...) and functorch transforms see. In a plain eager call
the dispatcher adds only host time (its Python and C++ crossings and output checks: 45 us for the forward,
80-220 us for the backward on the autograd engine's thread, measured on an H200's host), so there the
launcher runs directly.
"""

from __future__ import annotations

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


class EagerOp:
    """A ``torch.library`` custom op (``op``) over the function ``fn``; a call runs ``fn`` itself where
    ``direct`` allows it, else the op."""

    def __init__(self, name: str, fn, mutates_args=()):
        self.fn = fn
        self.op = torch.library.custom_op(name, fn, mutates_args=mutates_args)

    def __call__(self, *args):
        return self.fn(*args) if direct(*args) else self.op(*args)

    def register_fake(self, fake):
        return self.op.register_fake(fake)
