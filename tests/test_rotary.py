"""ioattn.rotary.apply_rotary_emb: flash-attn's RoPE helper, dense and varlen, against rotation as complex
multiplication, and equal to the rotation flash_attn_with_kvcache applies to appended keys."""

import pytest
import torch
from conftest import DEVICE

import ioattn
from ioattn.rotary import apply_rotary_emb


def _tables(seqlen_ro, rotary_dim, dtype=torch.float32):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    theta = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return theta.cos().to(DEVICE, dtype), theta.sin().to(DEVICE, dtype), theta


def _reference(x, theta, positions, rotary_dim, interleaved):
    """Each pair as a complex number times e^(i theta(position)), in float64; the rest of x unchanged."""
    x64 = x.double().cpu()
    rot = x64[..., :rotary_dim]
    if interleaved:
        z = torch.complex(rot[..., 0::2], rot[..., 1::2])
    else:
        z = torch.complex(rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:])
    angle = theta[positions.cpu()].unsqueeze(-2)  # (..., 1, rotary_dim / 2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        rotated = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((rotated, x64[..., rotary_dim:]), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [32, 16])
@pytest.mark.parametrize("offsets", ["zero", "int", "tensor"])
def test_dense_against_complex_rotation(interleaved, rotary_dim, offsets):
    torch.manual_seed(0)
    batch, seqlen, h, d = 3, 17, 2, 32
    x = torch.randn(batch, seqlen, h, d, device=DEVICE)
    off = {"zero": 0, "int": 5, "tensor": torch.tensor([0, 3, 9], device=DEVICE)}[offsets]
    cos, sin, theta = _tables(seqlen + 9, rotary_dim)
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=off)
    pos = torch.arange(seqlen)[None].expand(batch, seqlen) + (off.cpu()[:, None] if torch.is_tensor(off) else off)
    torch.testing.assert_close(out.double().cpu(), _reference(x, theta, pos, rotary_dim, interleaved),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


def test_varlen_equals_each_sequence_dense():
    torch.manual_seed(1)
    lens, h, d = [5, 0, 12, 3], 4, 64
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    x = torch.randn(sum(lens), h, d, device=DEVICE, dtype=torch.float16)
    cos, sin, _ = _tables(40, 48, torch.float16)
    off = torch.tensor([2, 0, 7, 30], device=DEVICE)
    out = apply_rotary_emb(x, cos, sin, seqlen_offsets=off, cu_seqlens=cu, max_seqlen=max(lens))
    for b, (start, n) in enumerate(zip(cu.tolist(), lens, strict=False)):
        dense = apply_rotary_emb(x[None, start:start + n], cos, sin, seqlen_offsets=int(off[b]))
        assert torch.equal(out[start:start + n], dense[0])


def test_inplace_and_gradient():
    torch.manual_seed(2)
    cos, sin, _ = _tables(10, 8, torch.float64)
    x = torch.randn(2, 6, 2, 8, device=DEVICE, dtype=torch.float64)
    y = x.clone()
    assert apply_rotary_emb(y, cos, sin, inplace=True) is y
    assert torch.equal(y, apply_rotary_emb(x, cos, sin))
    leaf = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_rotary_emb(t, cos, sin, interleaved=True, seqlen_offsets=2),
                                    (leaf,))


def test_errors_and_positions_past_the_tables():
    cos, sin, theta = _tables(8, 16)
    x = torch.randn(2, 8, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="alike"):
        apply_rotary_emb(x, cos, sin[:, :4])
    with pytest.raises(ValueError, match="exceeds headdim"):
        apply_rotary_emb(x[..., :8], cos, sin)
    with pytest.raises(ValueError, match=r"\(total, nheads, headdim\)"):
        apply_rotary_emb(x, cos, sin, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="fewer than the sequence length"):
        apply_rotary_emb(torch.randn(1, 9, 2, 32, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([1, 2, 3], device=DEVICE))
    # an offset past the tables' end leaves those positions unrotated (flash-attn's kernel), no error
    out = apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0, 5], device=DEVICE))
    assert torch.equal(out[1, 3:], x[1, 3:]) and not torch.equal(out[1, :3], x[1, :3])
    pos = torch.arange(3)[None] + 5
    torch.testing.assert_close(out[1:, :3].double().cpu(), _reference(x[1:, :3], theta, pos, 16, False),
                               atol=1e-5, rtol=1e-5)
    # a one-element offset tensor serves every sequence, as the int does
    assert torch.equal(apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor(2, device=DEVICE)),
                       apply_rotary_emb(x, cos, sin, seqlen_offsets=2))
    # varlen tokens past cu_seqlens[-1] belong to no sequence: untouched
    xv = torch.randn(10, 2, 32, device=DEVICE)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
    outv = apply_rotary_emb(xv, cos, sin, cu_seqlens=cu)
    assert torch.equal(outv[7:], xv[7:]) and not torch.equal(outv[4:7], xv[4:7])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rounds_once(dtype):
    """Products in float32, rounded once to x's dtype: the float64 rotation rounded to x's dtype, nearly
    everywhere (a rotation in x's own precision would round every product)."""
    torch.manual_seed(4)
    x = torch.randn(2, 64, 4, 64, device=DEVICE).to(dtype)
    cos, sin, theta = _tables(64, 64, torch.float32)
    out = apply_rotary_emb(x, cos, sin)
    ref = _reference(x, theta, torch.arange(64)[None].expand(2, 64), 64, False).to(dtype)
    assert (out.cpu() == ref).float().mean() > 0.99


def test_same_rotation_as_the_kv_cache_append():
    """flash_attn_with_kvcache(k=..., rotary_cos=..., rotary_interleaved=True) writes the keys that
    apply_rotary_emb(k, interleaved=True, seqlen_offsets=cache_seqlens) gives."""
    torch.manual_seed(3)
    batch, cap, hk, d, new = 2, 32, 2, 32, 3
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    k_cache, v_cache = (torch.zeros(batch, cap, hk, d, device=DEVICE, dtype=dtype) for _ in range(2))
    lens = torch.tensor([4, 11], dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, new, 2 * hk, d, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(batch, new, hk, d, device=DEVICE, dtype=dtype) for _ in range(2))
    cos, sin, _ = _tables(cap, 16, dtype)
    ioattn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens,
                                   causal=True, rotary_interleaved=True)
    expected = apply_rotary_emb(k, cos, sin, interleaved=True, seqlen_offsets=lens)
    for b, n in enumerate(lens.tolist()):
        torch.testing.assert_close(k_cache[b, n:n + new], expected[b], atol=2e-3, rtol=2e-3)
