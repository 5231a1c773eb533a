"""Merging split-KV partial results by their log-sum-exps (Flash-Decoding's reduction).

Split ``s`` holds the normalised output ``o_s`` and log-sum-exp ``lse_s`` of its keys; the whole row is
``lse = log sum_s exp(lse_s)`` and ``o = sum_s exp(lse_s - lse) o_s``. One program per (batch, query
token, head) reads all of its row's splits in one (splits x headdim) load, so the merge costs one memory
latency, not one per split, and there are enough programs to cover the SMs. Splits that saw no key have
``lse_s = -inf`` and weigh 0; a row where all do gives output 0 and lse -inf. VARLEN: the partial results
are those of packed variable-length queries by (sequence b, row i of it, at most ``seqlen_q``), the output
row of sequence b's row i is CuSeqlensQ[b] + i of the one batch row, and sequences of more rows than
``seqlen_q`` are another kernel's (rows the split-KV launch left out).
"""

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    OutPart, LsePart, Out, Lse, CuSeqlensQ,
    stride_ps, stride_pb, stride_pq, stride_ph,
    stride_lps, stride_lpb, stride_lpq, stride_lph,
    stride_ob, stride_oq, stride_oh, stride_lb, stride_lh, stride_lq,
    seqlen_q, num_splits,
    HEADDIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr = False,
):
    b = tl.program_id(0) // seqlen_q
    i = tl.program_id(0) % seqlen_q
    h = tl.program_id(1)
    o_b = b
    o_row = i
    if VARLEN:
        first = tl.load(CuSeqlensQ + b)
        rows_b = tl.load(CuSeqlensQ + b + 1) - first
        if (i >= rows_b) | (rows_b > seqlen_q):
            return
        o_b = 0
        o_row = first + i
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse_s = tl.load(LsePart + b.to(tl.int64) * stride_lpb + i * stride_lpq + h * stride_lph + offs_s * stride_lps,
                    mask=s_ok, other=float("-inf"))
    o_s = tl.load(OutPart + b.to(tl.int64) * stride_pb + i * stride_pq + h * stride_ph
                  + offs_s[:, None] * stride_ps + offs_d[None, :],
                  mask=s_ok[:, None] & (offs_d < HEADDIM)[None, :], other=0.0)
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp(lse_s - m_safe)
    total = tl.sum(weight, 0)
    empty = total == 0.0
    total_safe = tl.where(empty, 1.0, total)
    out = tl.sum(weight[:, None] * o_s, 0) / total_safe
    tl.store(Out + o_b.to(tl.int64) * stride_ob + o_row.to(tl.int64) * stride_oq + h * stride_oh + offs_d,
             out.to(Out.dtype.element_ty), mask=offs_d < HEADDIM)
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(total_safe))
    tl.store(Lse + o_b.to(tl.int64) * stride_lb + h * stride_lh + o_row.to(tl.int64) * stride_lq, lse)
