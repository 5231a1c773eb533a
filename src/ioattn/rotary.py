"""Rotary position embeddings (RoPE) with flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb``
signature, in PyTorch (any device, differentiable), for the dense and the varlen layouts.

The rotation is the one ``flash_attn_with_kvcache`` applies when given ``rotary_cos`` / ``rotary_sin``:
the first ``rotary_dim = 2 * cos.shape[-1]`` dims of each head turn by the angle of the token's position, in
pairs (2j, 2j + 1) when ``interleaved``, else (j, j + rotary_dim / 2) (GPT-NeoX's layout); the other dims
pass through. Products are taken in float32 (float64 for float64 x) and rounded once to x's dtype.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rotary_emb", "rotate"]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (..., headdim) with its first ``2 * cos.shape[-1]`` dims rotated; cos and sin broadcast against
    x[..., : cos.shape[-1]] (the angles of each pair)."""
    half = cos.shape[-1]
    ct = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 x
    rot = x[..., : 2 * half].to(ct)
    c, s = cos.to(ct), sin.to(ct)
    if interleaved:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    else:
        x0, x1 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _positions(x, seqlen_offsets, cu_seqlens, max_seqlen):
    """Each token's position: (batch, seqlen) for dense x, (total,) for varlen x."""
    device = x.device
    if cu_seqlens is None:
        batch, seqlen = x.shape[:2]
        pos = torch.arange(seqlen, device=device).expand(batch, seqlen)
        if isinstance(seqlen_offsets, torch.Tensor):
            return pos + seqlen_offsets.to(device=device, dtype=torch.long).view(batch, 1)
        return pos + int(seqlen_offsets)
    total = x.shape[0]
    token = torch.arange(total, device=device)
    starts = cu_seqlens.to(device=device, dtype=torch.long)
    seq = torch.searchsorted(starts[1:], token, right=True).clamp_(max=starts.numel() - 2)
    pos = token - starts[seq]
    if isinstance(seqlen_offsets, torch.Tensor):
        return pos + seqlen_offsets.to(device=device, dtype=torch.long)[seq]
    return pos + int(seqlen_offsets)


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """RoPE on x, as flash-attn's ``apply_rotary_emb``.

    Arguments:
        x: (batch, seqlen, nheads, headdim), or (total, nheads, headdim) with ``cu_seqlens``.
        cos, sin: (seqlen_ro, rotary_dim / 2), rotary_dim <= headdim, the angles of positions 0 .. seqlen_ro - 1.
        interleaved: pairs (2j, 2j + 1) (GPT-J) instead of (j, j + rotary_dim / 2) (GPT-NeoX).
        inplace: write the result into x and return x (inference; x must not need its own gradient).
        seqlen_offsets: int, or int (batch,): the position of each sequence's first token (a KV cache's
            length when decoding).
        cu_seqlens: int32 (batch + 1,) for the varlen layout; max_seqlen: accepted for flash-attn's signature
            (positions are found without it).
    Returns:
        x rotated, in x's dtype and shape.
    """
    if cos.shape != sin.shape or cos.dim() != 2:
        raise ValueError(f"cos and sin must be (seqlen_ro, rotary_dim / 2) alike, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    rank = 3 if cu_seqlens is not None else 4
    if x.dim() != rank:
        layout = "(total, nheads, headdim) with cu_seqlens" if rank == 3 else "(batch, seqlen, nheads, headdim)"
        raise ValueError(f"x must be {layout}, got shape {tuple(x.shape)}")
    if 2 * cos.shape[-1] > x.shape[-1]:
        raise ValueError(f"rotary_dim = 2 * cos.shape[-1] = {2 * cos.shape[-1]} exceeds headdim {x.shape[-1]}")
    pos = _positions(x, seqlen_offsets, cu_seqlens, max_seqlen)
    if not x.is_cuda and pos.numel() and int(pos.max()) >= cos.shape[0]:  # (a GPU indexes out of range loudly)
        raise ValueError(f"a position reaches {int(pos.max())} but cos / sin hold {cos.shape[0]} positions")
    c = cos.to(x.device)[pos].unsqueeze(-2)  # (..., 1, rotary_dim / 2): every head the same angle
    s = sin.to(x.device)[pos].unsqueeze(-2)
    out = rotate(x, c, s, interleaved)
    if inplace:
        return x.copy_(out)
    return out
