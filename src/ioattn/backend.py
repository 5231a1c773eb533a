"""Which implementation runs a call.

* CUDA tensors use the Triton kernels.
* CPU tensors use the chunked pure-PyTorch path (Rabe & Staats), except under ``TRITON_INTERPRET=1``,
  where CPU tensors go through the Triton kernels in Triton's interpreter (this is how CI tests kernels).
* ``IOATTN_BACKEND=triton`` or ``IOATTN_BACKEND=chunked`` forces one.
* Any other device (mps, xpu, ...) uses the chunked path, as every device does where Triton is not
  installed (it is a dependency on Linux x86-64 only).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "chunked")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> tuple[bool, str]:
    """Whether Triton can run here, and why not when it cannot."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a dependency on Linux x86-64
        return False, f"triton is not importable ({e})"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    if interpreting():
        return True, "TRITON_INTERPRET=1: kernels run in Triton's interpreter on CPU tensors"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the interpreter)"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device) -> str:
    forced = os.environ.get("IOATTN_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"IOATTN_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    if (device.type == "cuda" or (device.type == "cpu" and interpreting())) and _triton_importable():
        return "triton"
    return "chunked"
