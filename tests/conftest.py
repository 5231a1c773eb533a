"""Test set-up: without a CUDA device, the Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton.jit decorates anything, so this runs before ioattn is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
