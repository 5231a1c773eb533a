"""Dropout randomness shared by every backend.

The keep mask is a pure function of ``(seed, b, h, i, j)``: element ``(b, h, i, j)`` of a
(batch, nheads, seqlen_q, seqlen_k) grid is kept when ``u >= dropout_p``, where ``u`` is output
``j % 4`` of Triton's ``tl.randint4x(seed, counter)`` (Philox-4x32, 10 rounds) mapped to [0, 1) as
``tl.rand`` does, at the int64 counter ``((b * nheads + h) * seqlen_q + i) * cdiv(seqlen_k, 4) + j // 4``:
one Philox call serves four neighbouring keys. For varlen batches ``seqlen_q``/``seqlen_k`` are
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


# Philox-4x32-10 constants, as in triton/language/random.py.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
# tl.rand's int32 -> [0, 1) scale (uint_to_uniform_float), applied in float32.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * x`` for a uint32 constant ``a`` and uint32 values ``x`` held in int64.

    The 64-bit product would overflow int64, so ``a`` is split into 16-bit halves: every partial product
    stays below 2**49.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t = x * a_lo
    u = x * a_hi + (t >> 16)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox_uniform4(seed: int, offset: torch.Tensor) -> torch.Tensor:
    """The four outputs of ``tl.randint4x(seed, offset)`` (Triton 3.6), each mapped to [0, 1) as
    ``tl.rand`` maps its one, in plain torch, bit for bit.

    Arguments:
        seed: int in [0, 2**63); its low / high 32 bits are the Philox key.
        offset: int64 tensor of any shape, values in [0, 2**63); its low / high 32 bits are the first two
            Philox counter words, the other two are 0.
    Returns:
        float32 tensor of shape ``offset.shape + (4,)``, uniform in [0, 1).
    """
    c0 = offset & _MASK32
    c1 = offset >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    # uint_to_uniform_float: reinterpret as int32, fold negatives onto [0, 2**31), scale in float32.
    x = torch.stack((c0, c1, c2, c3), dim=-1)
    x = torch.where(x >= 2**31, x - 2**32, x)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def dropout_keep_mask(
    seed: int,
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
    device: torch.device | str | None = None,
    *,
    batch_index: int | None = None,
    q_start: int = 0,
    k_start: int = 0,
    q_len: int | None = None,
    k_len: int | None = None,
) -> torch.Tensor:
    """The keep mask of the module docstring, or a sub-block of it.

    Arguments:
        seed: the call's seed (:func:`draw_seed`).
        batch, nheads, seqlen_q, seqlen_k: the grid (for varlen: number of sequences, nheads,
            max_seqlen_q, max_seqlen_k).
        dropout_p: drop probability in [0, 1).
        device: where the mask is built.
        batch_index: None for all ``batch`` entries, or one batch index.
        q_start, q_len: query rows ``q_start : q_start + q_len`` (q_len None = to ``seqlen_q``).
        k_start, k_len: key columns likewise.
    Returns:
        bool (nb, nheads, q_len, k_len), True = kept; nb = batch, or 1 with ``batch_index``.
    """
    q_len = seqlen_q - q_start if q_len is None else q_len
    k_len = seqlen_k - k_start if k_len is None else k_len
    if batch_index is None:
        b = torch.arange(batch, dtype=torch.int64, device=device)
    else:
        b = torch.tensor([batch_index], dtype=torch.int64, device=device)
    h = torch.arange(nheads, dtype=torch.int64, device=device)
    i = torch.arange(q_start, q_start + q_len, dtype=torch.int64, device=device)
    row = ((b.view(-1, 1) * nheads + h.view(1, -1)) * seqlen_q).view(-1, nheads, 1) + i.view(1, 1, -1)
    # One Philox call per group of four keys: the groups that cover the columns, then their outputs in
    # key order, cut to the columns asked for.
    g_lo = k_start // 4
    g_hi = (k_start + k_len + 3) // 4
    g = torch.arange(g_lo, g_hi, dtype=torch.int64, device=device)
    counter = (row * ((seqlen_k + 3) // 4)).unsqueeze(-1) + g.view(1, 1, 1, -1)
    u = philox_uniform4(seed, counter).flatten(-2)
    first = k_start - 4 * g_lo
    return u[..., first:first + k_len] >= dropout_p
