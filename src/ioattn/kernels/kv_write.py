"""Writing new K/V tokens into a KV cache (paged or contiguous), with rotary embedding on the keys.

One program writes one token's K and V rows for a block of KV heads; one launch covers every new token
of a layer and step. A token's destination is a (row0, row1) pair of cache indices: (page, offset in
page) for a paged cache, (cache row, position) for a contiguous one, so both are the same kernel.
``rotary_load`` is also used by the decode kernel to rotate q as it loads it.
"""

import triton
import triton.language as tl

# How a token finds its cache slot (constexpr ADDRESSING).
SLOT_MAPPING = tl.constexpr(0)  # slot_mapping[t] = page * PAGE_SIZE + offset; negative = padding, skipped
APPEND_PAGED = tl.constexpr(1)  # position cache_seqlens[b] + j of sequence b, through block_table[b]
APPEND_CONTIGUOUS = tl.constexpr(2)  # position cache_seqlens[b] + j in cache row cache_batch_idx[b] (or b)


@triton.jit
def rotary_load(row_ptrs, pos, offs_d, mask, Cos, Sin, stride_ro,
                ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Loads the tile ``row_ptrs[:, None] + offs_d[None, :]`` and rotates its first ROTARY_DIM dims by the
    angles of positions ``pos`` (one per row); float32 result.

    RoFormer's rotation of pairs ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``: pairs are (2j, 2j+1)
    when INTERLEAVED (GPT-J) and (j, j + ROTARY_DIM / 2) otherwise (GPT-NeoX); cos/sin rows are
    (ROTARY_DIM / 2,) per position.
    """
    half: tl.constexpr = ROTARY_DIM // 2
    x = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if INTERLEAVED:
        partner = offs_d ^ 1
        j = offs_d // 2
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:
        partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
        j = offs_d % half
        sign = tl.where(offs_d < half, -1.0, 1.0)
    rot_mask = mask & (offs_d < ROTARY_DIM)[None, :]
    x_partner = tl.load(row_ptrs[:, None] + partner[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    angle = pos.to(tl.int64)[:, None] * stride_ro + j[None, :]
    cos = tl.load(Cos + angle, mask=rot_mask, other=1.0).to(tl.float32)
    sin = tl.load(Sin + angle, mask=rot_mask, other=0.0).to(tl.float32)
    return x * cos + sign[None, :] * x_partner * sin


@triton.jit
def kv_write_kernel(
    K, V, KCache, VCache, SlotMapping, CacheSeqlens, BlockTable, CacheBatchIdx, Cos, Sin,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_kc0, stride_kc1, stride_kch, stride_vc0, stride_vc1, stride_vch,
    stride_btb, stride_ro, seqlen_new, nheads_k,
    HEADDIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    ADDRESSING: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
    ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    token = tl.program_id(0)
    b = token // seqlen_new
    j = token % seqlen_new
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < nheads_k)[:, None] & (offs_d < HEADDIM)[None, :]
    pos = j
    if ADDRESSING == SLOT_MAPPING:
        slot = tl.load(SlotMapping + token).to(tl.int64)
        mask = mask & (slot >= 0)
        row0 = tl.maximum(slot, 0) // PAGE_SIZE
        row1 = tl.maximum(slot, 0) % PAGE_SIZE
    else:
        pos = tl.load(CacheSeqlens + b) + j
        if ADDRESSING == APPEND_PAGED:
            row0 = tl.load(BlockTable + b * stride_btb + pos // PAGE_SIZE).to(tl.int64)
            row1 = (pos % PAGE_SIZE).to(tl.int64)
        else:
            if HAS_BATCH_IDX:
                row0 = tl.load(CacheBatchIdx + b).to(tl.int64)
            else:
                row0 = b.to(tl.int64)
            row1 = pos.to(tl.int64)
    k_rows = K + b.to(tl.int64) * stride_kb + j * stride_ks + offs_h * stride_kh
    if ROTARY_DIM > 0:
        k = rotary_load(k_rows, pos + 0 * offs_h, offs_d, mask, Cos, Sin, stride_ro, ROTARY_DIM, INTERLEAVED)
    else:
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=mask)
    v_rows = V + b.to(tl.int64) * stride_vb + j * stride_vs + offs_h * stride_vh
    v = tl.load(v_rows[:, None] + offs_d[None, :], mask=mask)
    kc = KCache + row0 * stride_kc0 + row1 * stride_kc1 + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = VCache + row0 * stride_vc0 + row1 * stride_vc1 + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(VCache.dtype.element_ty), mask=mask)
