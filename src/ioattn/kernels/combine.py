"""Merging split-KV partial results by their log-sum-exps (Flash-Decoding's reduction).

Split ``s`` holds the normalised output ``o_s`` and log-sum-exp ``lse_s`` of its keys; the whole row is
``lse = log sum_s exp(lse_s)`` and ``o = sum_s exp(lse_s - lse) o_s``. One program per (batch, query
token, block of heads). Splits that saw no key have ``lse_s = -inf`` and weigh 0; a row where all do
gives output 0 and lse -inf.
"""

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    OutPart, LsePart, Out, Lse,
    stride_ps, stride_pb, stride_pq, stride_ph,
    stride_lps, stride_lpb, stride_lpq, stride_lph,
    stride_ob, stride_oq, stride_oh, stride_lb, stride_lh, stride_lq,
    seqlen_q, nheads, num_splits,
    HEADDIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0) // seqlen_q
    i = tl.program_id(0) % seqlen_q
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < nheads
    lse_row = LsePart + b.to(tl.int64) * stride_lpb + i * stride_lpq + offs_h * stride_lph
    lse_all = tl.load(lse_row[:, None] + offs_s[None, :] * stride_lps,
                      mask=h_ok[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"))
    m = tl.max(lse_all, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(lse_all - m_safe[:, None]), 1)

    mask = h_ok[:, None] & (offs_d < HEADDIM)[None, :]
    o_rows = OutPart + b.to(tl.int64) * stride_pb + i * stride_pq + offs_h * stride_ph
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for s in range(num_splits):
        weight = tl.exp(tl.load(lse_row + s * stride_lps, mask=h_ok, other=float("-inf")) - m_safe)
        o = tl.load(o_rows[:, None] + s * stride_ps + offs_d[None, :], mask=mask, other=0.0)
        acc += weight[:, None] * o

    empty = total == 0.0
    total_safe = tl.where(empty, 1.0, total)
    out = acc / total_safe[:, None]
    out_ptrs = (Out + b.to(tl.int64) * stride_ob + i * stride_oq + offs_h[:, None] * stride_oh
                + offs_d[None, :])
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=mask)
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(total_safe))
    tl.store(Lse + b.to(tl.int64) * stride_lb + offs_h * stride_lh + i * stride_lq, lse, mask=h_ok)
