"""Shared Triton helpers for every attention kernel: score modifiers, masks, dropout, the online softmax.

Logits are kept in log2 units (``s * log2(e)``) so the kernels can use ``exp2``; callers fold ``log2(e)``
into ``qk_scale``, ``softcap2`` and ``alibi_slope2`` on the host (see ``log2_units`` in the launcher).
Rows are query positions and cols key positions inside one sequence; ``diag = seqlen_k - seqlen_q`` is
the bottom-right alignment offset (query row ``i`` sits at key position ``i + diag``).
"""

import triton
import triton.language as tl

from ..backend import interpreting

# Bytes of a section's streamed operands that launch_order keeps within the L2 (FA3's choice for its
# scheduler: 32 MB of the H100's / H200's 50 MB).
L2_SECTION_BYTES = 32 << 20

# Compiled kernels, not Triton's interpreter. In the interpreter inline PTX does not run (``tanh`` always takes
# the precise formula, Philox's products tl.umulhi and a wrapping multiply), and Triton 3.6 multiplies bf16
# tiles wrongly in tl.dot (fp16 and fp32 are right: ``dot`` widens bf16 operands to fp32 there).
_COMPILED = tl.constexpr(not interpreting())
# ioattn.dropout's Philox-4x32 rounds (FlashAttention-2's choice; Triton's default is ten).
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """``tl.dot(a, b)`` (fp32 result) at ``PRECISION`` for fp32 operands; in the interpreter bf16 operands go
    in as fp32 (``_COMPILED``), on a GPU this is tl.dot itself."""
    if not _COMPILED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def tanh(x, FAST: tl.constexpr = False):
    """fp32 tanh. FAST (for 16-bit inputs, whose scores carry ~3 significant digits): one MUFU
    ``tanh.approx.f32`` (max relative error ~2^-11) instead of an exp, a precise fp32 division and two
    adds. Otherwise, and always in the interpreter, 1 - 2 / (e^{2x} + 1): saturates to +-1 without
    overflow NaNs (e^{2x} = inf gives 1, 0 gives -1)."""
    if FAST and _COMPILED:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return t


@triton.jit
def apply_softcap(qk, qk_scale, softcap2, SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr = False):
    """Raw ``q . k`` to log2-unit logits; with softcap returns ``(softcap2 * tanh(qk * qk_scale), tanh)``.

    With SOFTCAP, ``qk_scale = softmax_scale / softcap`` and ``softcap2 = softcap * log2(e)``; without it,
    ``qk_scale = softmax_scale * log2(e)`` and the returned tanh is the logits themselves (unused).
    FAST_TANH: see ``tanh`` (callers pass it for 16-bit inputs).
    """
    if SOFTCAP:
        t = tanh(qk * qk_scale, FAST_TANH)
        s = softcap2 * t
    else:
        s = qk * qk_scale
        t = s
    return s, t


@triton.jit
def allowed(rows, cols, seqlen_k, diag, window_left, window_right,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Bool tile (rows, cols): key in range and inside the bottom-right aligned window (causal = right 0)."""
    pos = rows[:, None] + diag
    ok = cols[None, :] < seqlen_k
    if HAS_LEFT:
        ok = ok & (cols[None, :] >= pos - window_left)
    if HAS_RIGHT:
        ok = ok & (cols[None, :] <= pos + window_right)
    return ok


@triton.jit
def bias_and_mask(s, rows, cols, seqlen_k, diag, alibi_slope2, window_left, window_right,
                  HAS_ALIBI: tl.constexpr, MASK: tl.constexpr, HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr):
    """ALiBi (``-slope * |i + diag - j|``) then masking to -inf where MASK says the tile may hold
    disallowed pairs. Tiles known to be fully allowed pass MASK=False and pay nothing."""
    if HAS_ALIBI:
        # In fp32 (exact below 2^24): an add with |.| and an FMA per element, where the integer form adds a
        # quarter-rate conversion per element.
        pos = (rows + diag).to(tl.float32)
        s = s - alibi_slope2 * tl.abs(pos[:, None] - cols.to(tl.float32)[None, :])
    if MASK:
        ok = allowed(rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def score_mod(qk, rows, cols, seqlen_k, diag, qk_scale, softcap2, alibi_slope2, window_left, window_right,
              SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr):
    """Raw score tile to masked log2-unit logits: scale, softcap, ALiBi, window/causal/bounds mask."""
    s, _ = apply_softcap(qk, qk_scale, softcap2, SOFTCAP)
    return bias_and_mask(s, rows, cols, seqlen_k, diag, alibi_slope2, window_left, window_right,
                         HAS_ALIBI, MASK, HAS_LEFT, HAS_RIGHT)


@triton.jit
def philox_grid(bh, max_seqlen_q, max_seqlen_k):
    """(int64 base, row stride) of the Philox counters of (batch * nheads + head) plane ``bh`` of the
    dropout grid (``ioattn.dropout``): four counters per 32 keys of a row."""
    stride = tl.cdiv(max_seqlen_k, 32) * 4
    return bh.to(tl.int64) * max_seqlen_q * stride, stride


@triton.jit
def philox_rows(bh, rows, max_seqlen_q, max_seqlen_k):
    """int64 Philox counter of each query row's first key group in plane ``bh`` (``base + row * stride``
    of ``philox_grid``)."""
    base, stride = philox_grid(bh, max_seqlen_q, max_seqlen_k)
    return base + rows.to(tl.int64) * stride


@triton.jit
def _mulhilo(a, b: tl.constexpr):
    """(high, low) 32 bits of the uint32 product a * b: one ``mul.wide.u32`` (a single IMAD.WIDE.U32 on
    sm_90, against IMAD.HI + IMAD for tl.umulhi and a multiply)."""
    if _COMPILED:
        hi, lo = tl.inline_asm_elementwise("{ .reg .b64 t; mul.wide.u32 t, $2, $3; mov.b64 {$1, $0}, t; }",
                                           "=r,=r,r,r", [a, a * 0 + b], dtype=(tl.uint32, tl.uint32),
                                           is_pure=True, pack=1)
    else:
        hi = tl.umulhi(a, a * 0 + b)
        lo = a * b
    return hi, lo


@triton.jit
def seed_value(seed, DROPOUT: tl.constexpr):
    """The call's dropout seed as an int64 value: with DROPOUT read from ``seed``, a pointer to the call's seed
    tensor (``ioattn.dropout.kernel_seed``; read by the kernel, so a captured CUDA graph reads each replay's),
    once a program or tile, outside the key loops; without, 0 (``seed`` is then an unused 0)."""
    if DROPOUT:
        return tl.load(seed)
    else:
        return 0


@triton.jit
def philox(seed, offset):
    """``tl.randint4x(seed, offset, PHILOX_ROUNDS)`` bit for bit (four uint32 words; int64 offset), with
    each round's two products as ``mul.wide.u32``. ``seed``: an int64 value (the callers load it)."""
    # The key as a tile: every element holds the same value, which the compiler keeps once.
    key = offset.to(tl.uint64) * 0 + seed
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = (key >> 32).to(tl.uint32)
    c0 = offset.to(tl.uint32)
    c1 = (offset >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, 0xCD9E8D57)
        hi_a, lo_a = _mulhilo(c0, 0xD2511F53)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def dropout_words_kept(w0, w1, w2, w3, dropout_p):
    """Keep flags of the eight 16-bit halves of one Philox call's words (``u >= ceil(dropout_p * 65536)``),
    joined as (..., e, c0, c1): half e of word c = 2 c1 + c0, each join appending an axis."""
    threshold = tl.math.ceil(dropout_p * 65536.0).to(tl.uint32)
    k0 = tl.join((w0 & 0xFFFF) >= threshold, (w0 >> 16) >= threshold)
    k1 = tl.join((w1 & 0xFFFF) >= threshold, (w1 >> 16) >= threshold)
    k2 = tl.join((w2 & 0xFFFF) >= threshold, (w2 >> 16) >= threshold)
    k3 = tl.join((w3 & 0xFFFF) >= threshold, (w3 >> 16) >= threshold)
    return tl.join(tl.join(k0, k1), tl.join(k2, k3))


@triton.jit
def dropout_keep(seed, philox_base, rows, cols, philox_row_stride, dropout_p):
    """Keep mask of ``ioattn.dropout`` on a (rows, cols) tile; ``cols`` starts at a multiple of 32 and
    holds a multiple of 32. Key ``j = 32 g + 8 c + 2 q + e`` of row ``i`` takes 16-bit half ``e`` of word
    ``c`` of ``philox(seed, base + i * row_stride + 4 g + q)``; ``seed``: ``seed_value``'s."""
    n: tl.constexpr = cols.shape[0]
    m: tl.constexpr = rows.shape[0]
    # The call column of each (g, q): one key of the group per call (the rest share it).
    calls = tl.max(tl.reshape(4 * (cols // 32) + (cols % 8) // 2, [n // 32, 4, 4, 2]), axis=3)
    calls = tl.reshape(tl.max(calls, axis=1), [n // 8])  # (g, q) flattened
    offs = philox_base + rows.to(tl.int64)[:, None] * philox_row_stride + calls[None, :]
    k = dropout_words_kept(*philox(seed, offs), dropout_p)  # (i, 4 g + q, e, c0, c1)
    k = tl.reshape(k, [m, n // 32, 4, 2, 2, 2])  # (i, g, q, e, c0, c1)
    k = tl.permute(k, [0, 1, 5, 4, 2, 3])  # (i, g, c1, c0, q, e): key 32 g + 16 c1 + 8 c0 + 2 q + e
    return tl.reshape(k, [m, n])


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One step of the online softmax (FA2 Alg. 1 lines 8-10) in log2 units.

    Returns the unnormalised probabilities ``p = exp2(s - m_new)``, the factor ``alpha = exp2(m_old -
    m_new)`` that rescales the accumulator, and the new running max and sum. Rows whose logits are all
    -inf so far keep m = -inf; their p and alpha are 0 instead of NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def kv_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, LO_ALIGN: tl.constexpr = 0):
    """Key blocks a query block [start_m, start_m + BLOCK_M) must visit, split in three ranges.

    Returns ``(lo, full_lo, full_hi, hi)``: [lo, full_lo) and [full_hi, hi) need masking, [full_lo,
    full_hi) holds only fully allowed blocks, and blocks outside [lo, hi) (above the causal diagonal,
    outside the window) are skipped entirely. All starts are multiples of BLOCK_N from lo; with a left
    window lo is a multiple of BLOCK_N, or of ``LO_ALIGN`` where given (loads that take any row, TMA's: the
    window's keys then fill fewer blocks).
    """
    diag = seqlen_k - seqlen_q
    lo = seqlen_k * 0  # a zero built from an argument: Gluon kernels call this too (no layout to give)
    hi = seqlen_k
    first_full = 0  # smallest key start such that every row of the block allows it
    last_full = seqlen_k  # keys below this are allowed by every row (and in range)
    if HAS_LEFT:
        lo = tl.maximum(start_m + diag - window_left, 0)
        LO_STEP: tl.constexpr = BLOCK_N if LO_ALIGN == 0 else LO_ALIGN
        lo = (lo // LO_STEP) * LO_STEP
        first_full = start_m + BLOCK_M - 1 + diag - window_left
    if HAS_RIGHT:
        hi = tl.minimum(start_m + BLOCK_M + diag + window_right, seqlen_k)
        last_full = tl.minimum(start_m + diag + window_right + 1, seqlen_k)
    hi = tl.maximum(hi, lo)
    full_lo = lo + tl.maximum(tl.cdiv(first_full - lo, BLOCK_N), 0) * BLOCK_N
    full_lo = tl.minimum(full_lo, hi)
    full_hi = full_lo + tl.maximum((last_full - full_lo) // BLOCK_N, 0) * BLOCK_N
    return lo, full_lo, full_hi, hi


@triton.jit
def q_block_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks a key block [start_n, start_n + BLOCK_N) receives gradient from (the transpose of
    ``kv_block_range``). Returns ``(lo, full_lo, full_hi, hi)`` as there, starts multiples of BLOCK_M."""
    diag = seqlen_k - seqlen_q
    lo = seqlen_q * 0  # a zero built from an argument: Gluon kernels call this too (no layout to give)
    hi = seqlen_q
    first_full = 0
    last_full = seqlen_q
    if HAS_RIGHT:
        # row i reaches key j when i + diag + right >= j
        lo = tl.maximum(start_n - diag - window_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        first_full = start_n + BLOCK_N - 1 - diag - window_right
    if HAS_LEFT:
        hi = tl.minimum(start_n + BLOCK_N - diag + window_left, seqlen_q)
        last_full = tl.minimum(start_n - diag + window_left + 1, seqlen_q)
    hi = tl.maximum(hi, lo)
    full_lo = lo + tl.maximum(tl.cdiv(first_full - lo, BLOCK_M), 0) * BLOCK_M
    full_lo = tl.minimum(full_lo, hi)
    full_hi = full_lo + tl.maximum((last_full - full_lo) // BLOCK_M, 0) * BLOCK_M
    if start_n + BLOCK_N > seqlen_k:
        # keys past the end are masked columns: every query block needs the masked path
        full_hi = full_lo
    return lo, full_lo, full_hi, hi


@triton.jit
def bias_and_mask_t(st, rows, cols, seqlen_k, diag, alibi_slope2, window_left, window_right,
                    HAS_ALIBI: tl.constexpr, MASK: tl.constexpr, HAS_LEFT: tl.constexpr,
                    HAS_RIGHT: tl.constexpr):
    """``bias_and_mask`` on a transposed (cols, rows) tile: the dK/dV kernel holds S^T so that every
    product it issues takes register operands as they come out of the previous one (no transposes)."""
    if HAS_ALIBI:
        pos = (rows + diag).to(tl.float32)
        st = st - alibi_slope2 * tl.abs(pos[None, :] - cols.to(tl.float32)[:, None])
    if MASK:
        pos = rows[None, :] + diag
        ok = cols[:, None] < seqlen_k
        if HAS_LEFT:
            ok = ok & (cols[:, None] >= pos - window_left)
        if HAS_RIGHT:
            ok = ok & (cols[:, None] <= pos + window_right)
        st = tl.where(ok, st, float("-inf"))
    return st


@triton.jit
def dropout_keep_t(seed, philox_base, rows, cols, philox_row_stride, dropout_p):
    """``dropout_keep`` on a transposed (cols, rows) tile: the same Philox offsets, so the same mask."""
    return tl.trans(dropout_keep(seed, philox_base, rows, cols, philox_row_stride, dropout_p))


@triton.jit
def seq_bounds(cu_seqlens_q, cu_seqlens_k, b, max_seqlen_q, max_seqlen_k, IS_VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of batch entry b: read from cu_seqlens for varlen batches,
    else (0, max_seqlen_q, 0, max_seqlen_k)."""
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + b)
        seqlen_q = tl.load(cu_seqlens_q + b + 1) - q_start
        k_start = tl.load(cu_seqlens_k + b)
        seqlen_k = tl.load(cu_seqlens_k + b + 1) - k_start
    else:
        q_start = b * 0  # zeros built from an argument: Gluon kernels call this too (no layout to give)
        seqlen_q = max_seqlen_q
        k_start = b * 0
        seqlen_k = max_seqlen_k
    return q_start, seqlen_q, k_start, seqlen_k


#: CUDA's limit on a grid's second and third dimensions.
MAX_GRID_YZ = 65535


def bh_grid(blocks: int, nheads: int, batch: int) -> tuple[int, ...]:
    """The grid of a kernel with a program per (block, sequence x head): ``(blocks, batch * nheads)`` where
    that fits CUDA's limit on the second axis (65535), else ``(blocks, nheads, batch)``, which the kernel's
    ``BH_AXES`` flag (``len(grid) == 3``) reads as two axes (``grid_row``). Both launch in the same order
    (blocks fastest, then heads, then sequences); the three-axis form bounds heads and sequences by 65535
    each, as flash-attn's grids do, and raises ``ValueError`` past that."""
    if batch * nheads <= MAX_GRID_YZ:
        return blocks, batch * nheads
    check_grid_bounds(batch, nheads)
    return blocks, nheads, batch


def check_grid_bounds(batch: int, nheads: int) -> None:
    """``ValueError`` unless ``bh_grid`` can launch ``batch`` sequences of ``nheads`` heads (the attention ops
    check it before their first kernel, whatever grid that kernel takes)."""
    if batch > MAX_GRID_YZ or nheads > MAX_GRID_YZ:
        raise ValueError(f"the attention kernels take at most {MAX_GRID_YZ} sequences and {MAX_GRID_YZ} heads a "
                         f"call (CUDA's grid limit), got {batch} sequences of {nheads} heads: split the batch")


@triton.jit
def grid_row(nheads, BH_AXES: tl.constexpr):
    """(sequence x head index, sequence, head) of this program in a ``bh_grid``: the second axis, or with
    BH_AXES (the three-axis form) the second and third."""
    if BH_AXES:
        h = tl.program_id(1)
        b = tl.program_id(2)
        bh = b * nheads + h
    else:
        bh = tl.program_id(1)
        b = bh // nheads
        h = bh % nheads
    return bh, b, h


@triton.jit
def grid_rows(BH_AXES: tl.constexpr):
    """How many (sequence x head) rows a ``bh_grid`` holds."""
    if BH_AXES:
        rows = tl.num_programs(1) * tl.num_programs(2)
    else:
        rows = tl.num_programs(1)
    return rows


def order_section(rows: int, row_bytes: int) -> int:
    """Rows per section of ``launch_order`` and of the Gluon forward's dynamic schedule: the largest power of
    two whose ``row_bytes`` each (the operands a row's programs stream: K and V in the forward, Q, dO and the
    fp32 dQ in the backward) fit in ``L2_SECTION_BYTES``, at least 1 and at most ``rows``."""
    fit = max(1, L2_SECTION_BYTES // max(1, row_bytes))
    return max(1, min(rows, 1 << (fit.bit_length() - 1)))


@triton.jit
def launch_order(pid0, pid1, n0, n1, section, REVERSE: tl.constexpr):
    """(block, row) that program (pid0, pid1) of an (n0 blocks, n1 rows) grid computes, so that the launch
    order (pid0 fastest, then pid1) runs the longest work first over sections of ``section`` rows: within a
    section every row's first block, then every row's second, ... (block 0 first, or block n0 - 1 with
    REVERSE). Causal blocks differ in length by the diagonal: launched row by row, each row's long blocks
    start late and the last rows leave a tail (a greedy model of 132 SMs running one program each: 0.93-0.95
    of the ideal at 2k-8k tokens, 0.98-1.00 in this order). Sections bound the rows in flight, so their
    operands stay in L2; ``section`` = 1 is the plain row-by-row order. Measured on an H200 (benchmarks/
    NOTES.md, "Causal launch order"): +3.5% for the Gluon backward at d = 128 (one program per SM), no gain
    where several programs share an SM (the portable kernels, the d = 64 Gluon forward keep the row order)."""
    lin = pid1 * n0 + pid0
    base = lin // (section * n0) * section
    width = tl.minimum(section, n1 - base)
    r = lin - base * n0
    block = r // width
    if REVERSE:
        block = n0 - 1 - block
    return block, base + r % width
