"""Dropout randomness shared by every backend.

The keep mask is a pure function of ``(seed, b, h, i, j)``: element ``(b, h, i, j)`` of a
(batch, nheads, seqlen_q, seqlen_k) grid is kept when ``u >= dropout_p``, where ``u`` is Triton's
``tl.rand(seed, offset)`` (Philox-4x32, 10 rounds) at the int64 offset
``((b * nheads + h) * seqlen_q + i) * seqlen_k + j``. For varlen batches ``seqlen_q``/``seqlen_k`` are
``max_seqlen_q``/``max_seqlen_k`` and ``i``, ``j`` are positions inside each sequence. Because the mask
is a function and not a stored tensor, the backward regenerates exactly the forward's mask, and the
chunked path and the Triton kernels drop the same elements for the same seed.

The seed is drawn from torch's default (CPU) generator, so ``torch.manual_seed`` makes runs repeatable
and no device synchronisation is needed.
"""

from __future__ import annotations

import torch


def draw_seed() -> int:
    """A fresh 62-bit seed from torch's default generator."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
