"""The reference against independent implementations: PyTorch SDPA (with explicit masks) and a naive
per-row loop written from the definitions, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from ioattn.reference import allowed_mask, attention_ref


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _naive(q, k, v, *, causal, window, softcap, slopes, scale):
    """One query row at a time, straight from the definitions in reference.py's docstring."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float64)
    left, right = window
    if causal:
        right = 0
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(sq):
                pos = i + sk - sq
                logits, vals = [], []
                for j in range(sk):
                    if left >= 0 and j < pos - left:
                        continue
                    if right >= 0 and j > pos + right:
                        continue
                    s = scale * float(q[bi, i, hi] @ k[bi, j, kh])
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        slope = slopes[hi] if slopes.dim() == 1 else slopes[bi, hi]
                        s -= float(slope) * abs(pos - j)
                    logits.append(s)
                    vals.append(v[bi, j, kh])
                if not logits:
                    continue
                m = max(logits)
                w = [math.exp(s - m) for s in logits]
                z = sum(w)
                lse[bi, hi, i] = m + math.log(z)
                out[bi, i, hi] = sum(wi * vi for wi, vi in zip(w, vals, strict=True)) / z
    return out, lse


@pytest.mark.parametrize(
    "sq,sk,h,hk,causal,window,softcap,alibi",
    [
        (5, 5, 2, 2, False, (-1, -1), 0.0, None),
        (3, 7, 4, 2, True, (-1, -1), 0.0, None),
        (7, 3, 2, 1, True, (-1, -1), 0.0, None),  # rows above the diagonal have no key
        (6, 9, 2, 2, False, (2, 1), 0.0, None),
        (6, 6, 2, 1, False, (-1, -1), 1.5, "heads"),
        (4, 6, 2, 2, True, (1, -1), 2.0, "batch"),
        (5, 4, 2, 2, False, (0, 0), 0.0, None),
    ],
)
def test_reference_matches_naive(sq, sk, h, hk, causal, window, softcap, alibi):
    torch.manual_seed(sq * 100 + sk)
    b, d = 2, 8
    q, k, v = _rand(b, sq, h, d), _rand(b, sk, hk, d), _rand(b, sk, hk, d)
    slopes = None
    if alibi == "heads":
        slopes = torch.rand(h, dtype=torch.float32)
    elif alibi == "batch":
        slopes = torch.rand(b, h, dtype=torch.float32)
    scale = 0.7
    out, lse = attention_ref(q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes,
                             softmax_scale=scale)
    out_n, lse_n = _naive(q, k, v, causal=causal, window=window, softcap=softcap, slopes=slopes, scale=scale)
    torch.testing.assert_close(out, out_n, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse.double(), lse_n, atol=1e-5, rtol=1e-6)  # lse is float32
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_sdpa(causal):
    torch.manual_seed(0)
    b, s, h, hk, d = 2, 33, 4, 2, 16
    q, k, v = _rand(b, s, h, d), _rand(b, s, hk, d), _rand(b, s, hk, d)
    out, _ = attention_ref(q, k, v, causal=causal)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_bottom_right_window_matches_sdpa_mask():
    torch.manual_seed(1)
    b, sq, sk, h, d = 1, 5, 12, 2, 8
    q, k, v = _rand(b, sq, h, d), _rand(b, sk, h, d), _rand(b, sk, h, d)
    mask = allowed_mask(sq, sk, causal=True, window_size=(3, -1))
    # Row i sits at key position i + 7: keys i+4 .. i+7 are allowed.
    assert mask[0].nonzero().flatten().tolist() == [4, 5, 6, 7]
    out, _ = attention_ref(q, k, v, causal=True, window_size=(3, -1))
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_empty_rows_give_zero_and_neg_inf():
    q, k, v = _rand(1, 6, 1, 4), _rand(1, 2, 1, 4), _rand(1, 2, 1, 4)
    out, lse = attention_ref(q, k, v, causal=True)
    # seqlen_q > seqlen_k, bottom-right: the first 4 rows see no key.
    assert torch.equal(out[0, :4], torch.zeros(4, 1, 4, dtype=torch.float64))
    assert torch.isneginf(lse[0, 0, :4]).all() and torch.isfinite(lse[0, 0, 4:]).all()


def test_dropout_mask_scales_kept_probabilities():
    torch.manual_seed(2)
    q, k, v = _rand(1, 4, 1, 4), _rand(1, 4, 1, 4), _rand(1, 4, 1, 4)
    keep = torch.rand(1, 1, 4, 4) > 0.3
    out, lse = attention_ref(q, k, v, dropout_p=0.3, dropout_mask=keep)
    _, lse_plain = attention_ref(q, k, v)
    probs = torch.softmax((q[0, :, 0] @ k[0, :, 0].T) / 2.0, dim=-1)
    expected = (probs * keep[0, 0] / 0.7) @ v[0, :, 0]
    torch.testing.assert_close(out[0, :, 0], expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_plain)


def test_low_precision_mode_keeps_dtype_and_is_close():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 16, 2, 32, dtype=torch.float16) for _ in range(3))
    out_lp, _ = attention_ref(q, k, v, upcast=False)
    out_hp, _ = attention_ref(q, k, v, upcast=True)
    assert out_lp.dtype == torch.float16 and out_hp.dtype == torch.float16
    assert (out_lp.float() - out_hp.float()).abs().max() < 1e-2
