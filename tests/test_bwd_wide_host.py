"""The wide Gluon backward (d = 256) on the host: what its launch carries for ALiBi and dropout, and the one
P / dS buffer dropout needs. Shapes only, CPU tensors (the kernel itself: tests/test_gluon_bwd.py, GPU)."""

import pytest
import torch

from ioattn.kernels import attn_bwd_gluon


def _wide_launch(alibi=None, dropout=0.0, config=None, batch=2, seqlen=1000, nheads=4, nheads_k=2):
    q = torch.zeros(batch, seqlen, nheads, 256, dtype=torch.bfloat16)
    k = torch.zeros(batch, seqlen, nheads_k, 256, dtype=torch.bfloat16)
    lse = torch.zeros(batch, nheads, seqlen)
    launches, parts, locks = attn_bwd_gluon.gluon_backward_launches(
        q, q, k, k, lse, k, k, q.float(), alibi, batch=batch, max_seqlen_q=seqlen, max_seqlen_k=seqlen,
        varlen=False, softmax_scale=256 ** -0.5, qk_scale=1.0, softcap2=0.0, window_size=(-1, -1),
        dropout_p=dropout, config=config)
    assert len(launches) == 1 and parts is None and locks == 0  # one launch: no tail split, no conversion
    return launches[0], (q, k, lse)


def test_wide_launch_flags():
    """ALiBi and dropout reach the wide kernel as flags, dropout with one P / dS buffer; plain keeps two."""
    plain, _ = _wide_launch()
    assert plain.launcher is attn_bwd_gluon._launch_wide
    assert (plain.flags["HAS_ALIBI"], plain.flags["DROPOUT"], plain.flags["BUFS"]) == (False, False, 2)
    slopes = torch.rand(2, 4)
    alibi, _ = _wide_launch(alibi=slopes)
    assert alibi.flags["HAS_ALIBI"] and not alibi.flags["DROPOUT"] and alibi.flags["BUFS"] == 2
    drop, _ = _wide_launch(dropout=0.1)
    assert drop.flags["DROPOUT"] and drop.flags["BUFS"] == 1


def test_wide_launch_arguments():
    """The built arguments line up with the kernel's parameters: the slopes, their batch stride, the seed and
    p where the kernel reads them."""
    slopes = torch.rand(2, 4)
    launch, (q, k, lse) = _wide_launch(alibi=slopes, dropout=0.25)
    args = launch.build(q, q, k, k, lse, lse, k, k, q.float(), lse, lse, slopes, lse, lse, 1234, 0.25, None, None)
    names = [n for n in attn_bwd_gluon.attn_bwd_gluon_wide_kernel.arg_names if n not in launch.flags]
    assert len(args) == len(names)
    got = dict(zip(names, args, strict=True))
    assert got["alibi_slopes"] is slopes and got["stride_ab"] == slopes.stride(0) == 4
    assert got["seed"] == 1234 and got["dropout_p"] == 0.25
    per_head, _ = _wide_launch(alibi=torch.rand(4))
    built = per_head.build(q, q, k, k, lse, lse, k, k, q.float(), lse, lse, torch.rand(4), lse, lse, 0, 0.0, None,
                           None)
    assert dict(zip(names, built, strict=True))["stride_ab"] == 0


def test_wide_dropout_refuses_two_buffers():
    """A config giving the wide dropout backward two P / dS buffers is refused with a clear error (its shared
    memory would not fit), not sent to the GPU."""
    two = attn_bwd_gluon.select_config(256, False, False)
    assert two.dq_stages == 2
    with pytest.raises(ValueError, match="one P / dS buffer"):
        _wide_launch(dropout=0.1, config=two)
    _wide_launch(config=two)  # without dropout two buffers are the shipped config
