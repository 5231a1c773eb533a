"""ioattn.padding: flash-attn's bert_padding helpers (unpad_input, pad_input, index_first_axis)."""

import pytest
import torch
from conftest import DEVICE

import ioattn
from ioattn.padding import index_first_axis, pad_input, unpad_input

MASKS = {
    "right": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
    "left": [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]],
    "holes-and-empty": [[1, 0, 1, 0, 1], [0, 0, 0, 0, 0], [1, 1, 0, 1, 1]],
}


@pytest.mark.parametrize("name", MASKS)
def test_unpad_pad_round_trip(name):
    mask = torch.tensor(MASKS[name], device=DEVICE)
    batch, seqlen = mask.shape
    x = torch.randn(batch, seqlen, 3, 4, device=DEVICE, requires_grad=True)
    packed, indices, cu, max_seqlen, seqused = unpad_input(x, mask)
    lens = mask.sum(-1).tolist()
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
    assert max_seqlen == max(lens) and seqused.dtype == torch.int32 and seqused.tolist() == lens
    assert torch.equal(packed, x.detach()[mask.bool()])  # row-major order of the kept tokens
    assert torch.equal(indices, torch.nonzero(mask.flatten()).flatten())
    back = pad_input(packed, indices, batch, seqlen)
    assert torch.equal(pad_input(packed.detach(), indices.int(), batch, seqlen), back.detach())  # int32 indices
    assert torch.equal(back, torch.where(mask.bool()[..., None, None], x.detach(), 0.0))
    back.sum().backward()
    assert torch.equal(x.grad, mask[..., None, None].expand_as(x).to(x.dtype))  # kept tokens only


def test_unused_mask_counts_in_cu_seqlens_not_in_seqused():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], device=DEVICE)
    unused = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]], device=DEVICE)
    x = torch.arange(8.0, device=DEVICE).view(2, 4, 1)
    packed, indices, cu, max_seqlen, seqused = unpad_input(x, mask, unused)
    assert packed.flatten().tolist() == [0.0, 1.0, 2.0, 4.0, 5.0, 6.0]
    assert cu.tolist() == [0, 3, 6] and max_seqlen == 3 and seqused.tolist() == [2, 1]
    with pytest.raises(ValueError, match="unused_mask"):
        unpad_input(x, mask, unused[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        unpad_input(x, mask[:, :3])


def test_index_first_axis_gradient():
    x = torch.randn(6, 2, device=DEVICE, requires_grad=True)
    idx = torch.tensor([4, 0, 3], device=DEVICE)
    y = index_first_axis(x, idx)
    assert torch.equal(y, x.detach()[idx])
    (y * torch.arange(1.0, 4.0, device=DEVICE)[:, None]).sum().backward()
    assert x.grad[:, 0].tolist() == [2.0, 0.0, 0.0, 3.0, 1.0, 0.0]


def test_padded_batch_through_varlen_equals_each_row_alone():
    """The usual use: unpad q/k/v by a padding mask, run the varlen function, pad the output back; each row's
    kept tokens get what a dense call on that row alone gives (causal), padding positions zero."""
    torch.manual_seed(0)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    mask = torch.tensor([[1] * 9 + [0] * 3, [0] * 5 + [1] * 7, [1] * 12], device=DEVICE)
    batch, seqlen, h, d = 3, 12, 2, 32
    q, k, v = (torch.randn(batch, seqlen, h, d, device=DEVICE, dtype=dtype) for _ in range(3))
    qu, indices, cu, max_s, _ = unpad_input(q, mask)
    ku, vu = (unpad_input(t, mask)[0] for t in (k, v))
    out = pad_input(ioattn.flash_attn_varlen_func(qu, ku, vu, cu, cu, max_s, max_s, causal=True), indices,
                    batch, seqlen)
    for b in range(batch):
        keep = mask[b].bool()
        ref = ioattn.flash_attn_func(q[b:b + 1, keep], k[b:b + 1, keep], v[b:b + 1, keep], causal=True)
        torch.testing.assert_close(out[b, keep], ref[0], atol=2e-3, rtol=2e-3)
        assert (out[b, ~keep] == 0).all()
