"""From padded batches to the varlen functions' packed layout and back, with flash-attn's ``bert_padding``
signatures (2.6+), so code written against ``flash_attn.bert_padding`` runs unchanged.

A padded batch holds ``batch`` rows of ``seqlen`` positions and a mask of the real tokens; the varlen
functions take the real tokens alone, packed in row-major order, with ``cu_seqlens``. Tokens of a row need
not be contiguous (left or right padding, or holes): each row's kept tokens are packed in their order.
Every function here is differentiable in its tensor input and launches no custom kernel.
"""

from __future__ import annotations

import torch

__all__ = ["index_first_axis", "pad_input", "unpad_input"]


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[indices]`` along the first axis: (n, ...) -> (len(indices), ...), differentiable (the gradient of
    a row no index names is zero)."""
    return x.index_select(0, indices)


def unpad_input(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """The real tokens of a padded batch, packed.

    Arguments:
        hidden_states: (batch, seqlen, ...).
        attention_mask: (batch, seqlen), bool or integer; nonzero = a real token.
        unused_mask: None, or (batch, seqlen) likewise: positions allocated but unused (kept in the packed
            tensor and counted in ``cu_seqlens``, not in ``seqused``), as flash-attn's.
    Returns:
        hidden_states (total, ...): the kept positions in row-major order;
        indices int64 (total,): each one's position in the flattened (batch * seqlen) batch;
        cu_seqlens int32 (batch + 1,): the packed rows' boundaries (``flash_attn_varlen_func``'s);
        max_seqlen_in_batch: int, the longest row (a host read, as flash-attn's);
        seqused int32 (batch,): the real tokens of each row (attention_mask's count).
    """
    if hidden_states.dim() < 2 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"attention_mask must be (batch, seqlen) = {tuple(hidden_states.shape[:2])}, got "
                         f"{tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    if unused_mask is not None:
        if unused_mask.shape != attention_mask.shape:
            raise ValueError(f"unused_mask must have attention_mask's shape {tuple(attention_mask.shape)}, got "
                             f"{tuple(unused_mask.shape)}")
        keep = keep | unused_mask.bool()
    seqlens = keep.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = torch.zeros(seqlens.numel() + 1, dtype=torch.int32, device=seqlens.device)
    torch.cumsum(seqlens, dim=0, dtype=torch.int32, out=cu_seqlens[1:])
    packed = index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices)
    return packed, indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of ``unpad_input``: (total, ...) packed rows at ``indices`` of a (batch, seqlen, ...)
    batch of zeros, differentiable."""
    flat = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    flat = flat.index_copy(0, indices.long(), hidden_states)  # int32 indices too, as flash-attn takes them
    return flat.reshape(batch, seqlen, *hidden_states.shape[1:])
