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


def _offsets(seqlen_offsets, batch: int, device) -> torch.Tensor | int:
    """The offsets as an int or an int64 (batch,) tensor on ``device`` (a one-element tensor serves every
    sequence)."""
    if not isinstance(seqlen_offsets, torch.Tensor):
        return int(seqlen_offsets)
    off = seqlen_offsets.to(device=device, dtype=torch.long).reshape(-1)
    if off.numel() == 1:
        return off.expand(batch)
    if off.numel() != batch:
        raise ValueError(f"seqlen_offsets must be an int or a ({batch},) tensor, got shape "
                         f"{tuple(seqlen_offsets.shape)}")
    return off


def _positions(x, seqlen_offsets, cu_seqlens):
    """Each token's position, and whether it is a sequence's token: (batch, seqlen) for dense x, (total,) for
    varlen x (tokens past ``cu_seqlens[-1]`` belong to none)."""
    device = x.device
    if cu_seqlens is None:
        batch, seqlen = x.shape[:2]
        off = _offsets(seqlen_offsets, batch, device)
        pos = torch.arange(seqlen, device=device).expand(batch, seqlen)
        return pos + (off.view(batch, 1) if isinstance(off, torch.Tensor) else off), None
    total, batch = x.shape[0], cu_seqlens.shape[0] - 1
    off = _offsets(seqlen_offsets, batch, device)
    token = torch.arange(total, device=device)
    starts = cu_seqlens.to(device=device, dtype=torch.long)
    seq = torch.searchsorted(starts[1:], token, right=True)
    inside = seq < batch
    seq = seq.clamp(max=max(batch - 1, 0))
    pos = token - starts[seq]
    return pos + (off[seq] if isinstance(off, torch.Tensor) else off), inside


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
        seqlen_offsets: int, or int (batch,) (or one-element) tensor: the position of each sequence's first
            token (a KV cache's length when decoding). Positions past the tables stay unrotated, as in
            flash-attn.
        cu_seqlens: int32 (batch + 1,) for the varlen layout; max_seqlen: its longest sequence, checked
            against the tables' length when given (as the dense length always is).
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
    seqlen_ro = cos.shape[0]
    longest = x.shape[1] if cu_seqlens is None else max_seqlen
    if longest is not None and longest > seqlen_ro:
        raise ValueError(f"cos / sin hold {seqlen_ro} positions, fewer than the sequence length {longest}")
    pos, inside = _positions(x, seqlen_offsets, cu_seqlens)
    # As flash-attn's kernel: a position outside the tables (an offset past their end) is left unrotated, and
    # so is a token of no sequence; no host read, no out-of-range index.
    valid = (pos >= 0) & (pos < seqlen_ro)
    if inside is not None:
        valid = valid & inside
    idx = pos.clamp(0, max(seqlen_ro - 1, 0))
    c = torch.where(valid[..., None], cos.to(x.device)[idx], 1.0).unsqueeze(-2)  # (..., 1, rotary_dim / 2)
    s = torch.where(valid[..., None], sin.to(x.device)[idx], 0.0).unsqueeze(-2)  # every head the same angle
    out = rotate(x, c, s, interleaved)
    if inplace:
        return x.copy_(out)
    return out
