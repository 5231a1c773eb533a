"""Memory-efficient exact attention in pure PyTorch, after Rabe & Staats (arXiv 2112.05682).

Queries are processed in chunks of ``query_chunk_size`` rows and keys in chunks of ``key_chunk_size``
columns. Each query chunk keeps a running row maximum, a running sum of exponentials and an unnormalised
output (the paper's Section 3 with the online-softmax rescaling), so only one
(query_chunk, key_chunk) tile of scores exists at a time. The backward recomputes every tile from
q, k, v, out and the log-sum-exp (FlashAttention-2's Algorithm 2: ``delta = rowsum(dO * O)``,
``dS = P * (dP - delta)``), so no (seqlen_q, seqlen_k) matrix exists in the forward or the backward.

Grouped-query attention reads the key/value heads directly: queries are viewed as
(batch, nheads_k, group, seqlen_q, headdim) and a tile's group rows are stacked into one matmul.
Key chunks that the causal / window mask removes entirely are never computed. Semantics are those of
:mod:`ioattn.reference`. Arithmetic runs in float32 (float64 for float64 inputs).

Chunk sizes: ``memory_efficient_attention`` takes the paper's (1024 queries, 4096 keys) unless told
otherwise. The interface's calls leave them to ``default_chunks``: the paper's off the CPU; on a CPU, smaller
tiles, which keep a tile of every head in cache and let causal and window masks skip finer blocks.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from . import validation as V
from .dropout import call_seed, dropout_keep_mask

__all__ = ["memory_efficient_attention", "chunked_attention", "chunked_attention_varlen"]


@dataclass(frozen=True)
class _Spec:
    """Everything about a call except q, k, v and the slopes: masks, score modifiers, the dropout seed (a
    tensor) and grid, chunking."""

    scale: float
    left: int
    right: int
    softcap: float
    dropout_p: float
    seed: torch.Tensor | None  # the call's seed tensor (``ioattn.dropout.call_seed``), None without dropout
    drop_batch_index: int | None  # varlen: this sequence's index in the dropout grid
    drop_grid: tuple[int, int, int] | None  # (batch, seqlen_q, seqlen_k) of the dropout grid
    query_chunk: int
    key_chunk: int


# The paper's chunk sizes (Rabe & Staats use 1024 queries and 4096 keys).
PAPER_CHUNKS = (1024, 4096)


def default_chunks(device: torch.device, rows: int) -> tuple[int, int]:
    """(query_chunk, key_chunk) for a call that gives none; ``rows`` = batch x query heads, the tiles every
    chunk pair stacks. Off the CPU the paper's sizes. On a CPU (2-core host, float32 and bfloat16, head dims
    64 and 128, 512 to 16k tokens, against the paper's sizes): (256, 512) where more than eight rows share a
    tile, else (512, 1024); forward 1.0-1.5x non-causal and up to 2.0x causal, forward + backward 1.0-1.3x and
    1.1-1.9x (benchmarks/NOTES.md, "the chunked path's tiles on a CPU")."""
    if device.type != "cpu":
        return PAPER_CHUNKS
    return (256, 512) if rows > 8 else (512, 1024)


def _key_range(i0: int, i1: int, seqlen_q: int, seqlen_k: int, left: int, right: int) -> tuple[int, int]:
    """Keys [lo, hi) that any query row in [i0, i1) may attend to (bottom-right aligned window)."""
    shift = seqlen_k - seqlen_q
    lo = max(0, i0 + shift - left) if left >= 0 else 0
    hi = min(seqlen_k, i1 - 1 + shift + right + 1) if right >= 0 else seqlen_k
    return lo, hi


def _tile_mask(i0, i1, j0, j1, seqlen_q, seqlen_k, left, right, device) -> torch.Tensor | None:
    """Bool (i1 - i0, j1 - j0) of allowed pairs, or None when the whole tile is allowed."""
    shift = seqlen_k - seqlen_q
    full_left = left < 0 or j0 >= i1 - 1 + shift - left
    full_right = right < 0 or j1 - 1 <= i0 + shift + right
    if full_left and full_right:
        return None
    row = torch.arange(i0, i1, device=device).view(-1, 1) + shift
    col = torch.arange(j0, j1, device=device).view(1, -1)
    ok = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= col >= row - left
    if right >= 0:
        ok &= col <= row + right
    return ok


def _scores(q_c, k_c, slopes, spec, i0, i1, j0, j1, seqlen_q, seqlen_k, keep_tanh=False):
    """Scores of one tile, float (b, hk, g, qc, kc) with disallowed pairs at -inf, and the softcap's tanh.

    ``q_c`` is (b, hk, g, qc, d) already multiplied by the softmax scale, ``k_c`` is (b, hk, kc, d).
    With ``keep_tanh`` (backward) the tanh tile is returned separately; otherwise it becomes the scores.
    """
    b, hk, g, qc, d = q_c.shape
    kc = k_c.shape[2]
    s = torch.matmul(q_c.reshape(b, hk, g * qc, d), k_c.transpose(-1, -2)).view(b, hk, g, qc, kc)
    tanh = None  # kept only for the backward's tanh derivative
    if spec.softcap > 0:
        tanh = torch.tanh_(s.div_(spec.softcap))
        s = tanh * spec.softcap if keep_tanh else tanh.mul_(spec.softcap)
    if slopes is not None:
        row = torch.arange(i0, i1, device=s.device, dtype=s.dtype).view(-1, 1) + (seqlen_k - seqlen_q)
        col = torch.arange(j0, j1, device=s.device, dtype=s.dtype).view(1, -1)
        s.addcmul_(slopes, (row - col).abs_(), value=-1.0)
    mask = _tile_mask(i0, i1, j0, j1, seqlen_q, seqlen_k, spec.left, spec.right, s.device)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return s, tanh


def _keep(spec, b, hk, g, i0, i1, j0, j1, device) -> torch.Tensor:
    """Dropout keep mask of one tile, bool (b, hk, g, qc, kc)."""
    batch, grid_q, grid_k = spec.drop_grid
    keep = dropout_keep_mask(spec.seed, batch, hk * g, grid_q, grid_k, spec.dropout_p, device,
                             batch_index=spec.drop_batch_index, q_start=i0, k_start=j0,
                             q_len=i1 - i0, k_len=j1 - j0)
    return keep.view(b, hk, g, i1 - i0, j1 - j0)


def _split_heads(x: torch.Tensor, hk: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, s, hk * g, d) -> (b, hk, g, s, d) in ``dtype``."""
    b, s, h, d = x.shape
    return x.reshape(b, s, hk, h // hk, d).permute(0, 2, 3, 1, 4).to(dtype)


def _forward(q, k, v, slopes, spec: _Spec):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = _split_heads(q, hk, dtype)
    kh = k.permute(0, 2, 1, 3)
    vh = v.permute(0, 2, 1, 3)
    out = torch.zeros(b, hk, g, sq, d, dtype=dtype, device=q.device)
    lse = torch.full((b, hk, g, sq), float("-inf"), dtype=dtype, device=q.device)
    for i0 in range(0, sq, spec.query_chunk):
        i1 = min(sq, i0 + spec.query_chunk)
        lo, hi = _key_range(i0, i1, sq, sk, spec.left, spec.right)
        if hi <= lo:
            continue  # every row of this chunk has no allowed key: out 0, lse -inf
        q_c = qg[:, :, :, i0:i1] * spec.scale
        row_max = torch.full((b, hk, g, i1 - i0), float("-inf"), dtype=dtype, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(b, hk, g, i1 - i0, d, dtype=dtype, device=q.device)
        for j0 in range(lo, hi, spec.key_chunk):
            j1 = min(hi, j0 + spec.key_chunk)
            s, _ = _scores(q_c, kh[:, :, j0:j1].to(dtype), slopes, spec, i0, i1, j0, j1, sq, sk)
            new_max = torch.maximum(row_max, s.amax(dim=-1))
            # A row with no allowed key so far keeps max -inf; shift it by 0 so exp gives 0, not NaN.
            safe_max = torch.where(new_max == float("-inf"), 0.0, new_max)
            alpha = torch.exp(row_max - safe_max)
            p = s.sub_(safe_max.unsqueeze(-1)).exp_()
            row_sum = row_sum * alpha + p.sum(dim=-1)
            if spec.dropout_p > 0:
                p.masked_fill_(~_keep(spec, b, hk, g, i0, i1, j0, j1, q.device), 0.0)
            pv = torch.matmul(p.view(b, hk, g * (i1 - i0), j1 - j0), vh[:, :, j0:j1].to(dtype))
            del s, p  # free this tile before the next one is allocated: one tile alive at a time
            acc = acc * alpha.unsqueeze(-1) + pv.view(b, hk, g, i1 - i0, d)
            row_max = new_max
        nonempty = row_sum > 0
        denom = torch.where(nonempty, row_sum, 1.0) * (1.0 - spec.dropout_p)
        out[:, :, :, i0:i1] = acc / denom.unsqueeze(-1)
        lse[:, :, :, i0:i1] = torch.where(nonempty, row_max + torch.log(row_sum), float("-inf"))
    # lse stays in the working precision for the backward (float64 gradcheck needs it).
    return out.permute(0, 3, 1, 2, 4).reshape(b, sq, h, d).to(q.dtype), lse.reshape(b, h, sq)


def _backward(do, q, k, v, out, lse, slopes, spec: _Spec):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = _split_heads(q, hk, dtype)
    dog = _split_heads(do, hk, dtype)
    delta = (dog * _split_heads(out, hk, dtype)).sum(dim=-1)  # (b, hk, g, sq)
    lse_g = lse.view(b, hk, g, sq).to(dtype)
    # Rows with lse -inf have every score at -inf; exp(-inf - 0) = 0 keeps their gradients 0.
    lse_g = torch.where(lse_g == float("-inf"), 0.0, lse_g)
    kh = k.permute(0, 2, 1, 3)
    vh = v.permute(0, 2, 1, 3)
    dq = torch.zeros(b, hk, g, sq, d, dtype=dtype, device=q.device)
    dk = torch.zeros(b, hk, sk, d, dtype=dtype, device=q.device)
    dv = torch.zeros(b, hk, sk, d, dtype=dtype, device=q.device)
    for i0 in range(0, sq, spec.query_chunk):
        i1 = min(sq, i0 + spec.query_chunk)
        qc = i1 - i0
        lo, hi = _key_range(i0, i1, sq, sk, spec.left, spec.right)
        if hi <= lo:
            continue
        q_c = qg[:, :, :, i0:i1] * spec.scale
        do_c = dog[:, :, :, i0:i1].reshape(b, hk, g * qc, d)
        dq_c = torch.zeros(b, hk, g * qc, d, dtype=dtype, device=q.device)
        for j0 in range(lo, hi, spec.key_chunk):
            j1 = min(hi, j0 + spec.key_chunk)
            kc = j1 - j0
            k_c = kh[:, :, j0:j1].to(dtype)
            v_c = vh[:, :, j0:j1].to(dtype)
            s, tanh = _scores(q_c, k_c, slopes, spec, i0, i1, j0, j1, sq, sk, keep_tanh=True)
            p = s.sub_(lse_g[:, :, :, i0:i1, None]).exp_()
            dp = torch.matmul(do_c, v_c.transpose(-1, -2)).view(b, hk, g, qc, kc)
            if spec.dropout_p > 0:
                keep_scaled = _keep(spec, b, hk, g, i0, i1, j0, j1, q.device).to(dtype)
                keep_scaled /= 1.0 - spec.dropout_p
                p_drop = (p * keep_scaled).view(b, hk, g * qc, kc)
                dv[:, :, j0:j1] += torch.matmul(p_drop.transpose(-1, -2), do_c)
                del p_drop
                dp.mul_(keep_scaled)
                del keep_scaled
            else:
                dv[:, :, j0:j1] += torch.matmul(p.view(b, hk, g * qc, kc).transpose(-1, -2), do_c)
            ds = p.mul_(dp.sub_(delta[:, :, :, i0:i1, None]))
            del dp
            if tanh is not None:
                ds.mul_(1.0 - tanh.square_())  # d(softcap * tanh(x / softcap)) / dx
            ds = ds.view(b, hk, g * qc, kc)
            dq_c += torch.matmul(ds, k_c)
            dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), q_c.reshape(b, hk, g * qc, d))
            del s, p, ds, tanh
        dq[:, :, :, i0:i1] = dq_c.view(b, hk, g, qc, d) * spec.scale
    dq = dq.permute(0, 3, 1, 2, 4).reshape(b, sq, h, d).to(q.dtype)
    return dq, dk.permute(0, 2, 1, 3).to(k.dtype), dv.permute(0, 2, 1, 3).to(v.dtype)


def _slopes_view(alibi_slopes: torch.Tensor | None, hk: int, g: int, dtype: torch.dtype):
    """(nheads,) or (batch, nheads) slopes as (1 or batch, hk, g, 1, 1) for broadcasting over a tile."""
    if alibi_slopes is None:
        return None
    return alibi_slopes.to(dtype).reshape(-1, hk, g, 1, 1)


def _autocast_off(t: torch.Tensor):
    """A context without autocast for t's device type where it is on: the tiles' products and their fp32
    accumulation run in the precisions the code chose (the interface casts the inputs to autocast's dtype
    first, ``validation.autocast_qkv``); a null context otherwise."""
    if V.autocast_on(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alibi_slopes, spec: _Spec):
        hk = k.shape[2]
        slopes = _slopes_view(alibi_slopes, hk, q.shape[2] // hk, torch.promote_types(q.dtype, torch.float32))
        with _autocast_off(q):
            out, lse = _forward(q, k, v, slopes, spec)
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.spec = spec
        lse_out = lse.float()
        ctx.mark_non_differentiable(lse_out)
        return out, lse_out

    @staticmethod
    @once_differentiable  # its in-place tile updates have no second derivative: raise rather than guess
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, slopes = ctx.saved_tensors
        with _autocast_off(q):
            dq, dk, dv = _backward(dout, q, k, v, out, lse, slopes, ctx.spec)
        return dq, dk, dv, None, None


def _chunks(q: torch.Tensor, rows: int, query_chunk_size: int | None, key_chunk_size: int | None):
    """The chunk sizes a call runs with: each one given, or ``default_chunks``'s."""
    auto = default_chunks(q.device, rows)
    return (auto[0] if query_chunk_size is None else query_chunk_size,
            auto[1] if key_chunk_size is None else key_chunk_size)


def _spec(softmax_scale, causal, window_size, softcap, dropout_p, seed, drop_batch_index, drop_grid,
          query_chunk_size, key_chunk_size) -> _Spec:
    left, right = window_size
    if causal:
        right = 0
    if query_chunk_size < 1 or key_chunk_size < 1:
        raise ValueError(f"chunk sizes must be positive, got query_chunk_size={query_chunk_size}, "
                         f"key_chunk_size={key_chunk_size}")
    return _Spec(float(softmax_scale), int(left), int(right), float(softcap), float(dropout_p), seed,
                 drop_batch_index, drop_grid, int(query_chunk_size), int(key_chunk_size))


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked attention on already-validated arguments (the interface's core op). Differentiable.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim).
        alibi_slopes: float32 (nheads,) or (batch, nheads), or None.
        query_chunk_size, key_chunk_size: None takes ``default_chunks`` (each independently).
        Other arguments as in :func:`ioattn.flash_attn_func`.
    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype, lse float32 (batch, nheads, seqlen_q).
    """
    query_chunk_size, key_chunk_size = _chunks(q, q.shape[0] * q.shape[2], query_chunk_size, key_chunk_size)
    seed = call_seed(q, dropout_p)
    spec = _spec(softmax_scale, causal, window_size, softcap, dropout_p, seed, None,
                 (q.shape[0], q.shape[1], k.shape[1]), query_chunk_size, key_chunk_size)
    return _ChunkedAttention.apply(q, k, v, alibi_slopes, spec)


def chunked_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked attention over packed variable-length sequences, one sequence at a time. Differentiable.

    Arguments:
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative lengths; empty sequences allowed.
        max_seqlen_q, max_seqlen_k: the dropout grid's seqlen_q / seqlen_k.
        alibi_slopes: float32 (nheads,) or (batch, nheads), or None.
        query_chunk_size, key_chunk_size: None takes ``default_chunks`` for one sequence's heads.
    Returns:
        out (total_q, nheads, headdim) in q's dtype, lse float32 (nheads, total_q).
    """
    query_chunk_size, key_chunk_size = _chunks(q, q.shape[1], query_chunk_size, key_chunk_size)
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist()
    batch = len(starts_q) - 1
    seed = call_seed(q, dropout_p)
    outs, lses = [], []
    for b in range(batch):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        spec = _spec(softmax_scale, causal, window_size, softcap, dropout_p, seed, b,
                     (batch, max_seqlen_q, max_seqlen_k), query_chunk_size, key_chunk_size)
        out, lse = _ChunkedAttention.apply(q[q0:q1].unsqueeze(0), k[k0:k1].unsqueeze(0),
                                           v[k0:k1].unsqueeze(0), slopes, spec)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=-1)


def memory_efficient_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    query_chunk_size: int = PAPER_CHUNKS[0],
    key_chunk_size: int = PAPER_CHUNKS[1],
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with memory linear in the sequence length: one (query_chunk, key_chunk) tile at a time.

    Works on any device torch supports; differentiable (the backward recomputes tiles).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), float16 / bfloat16 / float32.
        k: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (MQA/GQA).
        v: (batch, seqlen_k, nheads_k, headdim).
        causal: causal mask, aligned bottom-right when seqlen_q != seqlen_k.
        softmax_scale: scale of q k^T; default 1 / sqrt(headdim).
        window_size: (left, right) sliding window; a negative side (-1) is unbounded on that side.
        softcap: if > 0, scores become softcap * tanh(scores / softcap); <= 0 is off.
        alibi_slopes: float32 (nheads,) or (batch, nheads).
        q, k, v whose last dimension is strided are copied first.
        query_chunk_size: query rows per chunk (the paper uses 1024).
        key_chunk_size: key columns per chunk (the paper uses 4096).
        return_lse: also return the log-sum-exp.
    Returns:
        out: (batch, seqlen_q, nheads, headdim) in q's dtype, and, with ``return_lse``, lse float32
        (batch, nheads, seqlen_q), -inf for a row with no allowed key.
    """
    q, k, v, (nheads, _, headdim) = V.qkv_unit_stride(q, k, v, rank=4)
    window = V.check_window(window_size)
    softcap = V.check_scalars(0.0, softcap, softmax_scale)
    V.check_alibi(alibi_slopes, q.shape[0], nheads, q.device)
    for name, val in (("query_chunk_size", query_chunk_size), ("key_chunk_size", key_chunk_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(headdim)
    out, lse = chunked_attention(q, k, v, softmax_scale=scale, causal=bool(causal), window_size=window,
                                 softcap=float(softcap), alibi_slopes=alibi_slopes, dropout_p=0.0,
                                 query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size)
    return (out, lse) if return_lse else out
