"""Plain eager calls run the launchers directly; anything that must see the custom ops still does."""

import torch
from conftest import DEVICE
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import ioattn
from ioattn.ops._dispatch import direct


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_direct_only_for_plain_eager_tensors():
    t = torch.zeros(2)
    assert direct(t, None, 3, 0.5)
    assert not direct(torch.nn.Parameter(t))
    with _Recorder():
        assert not direct(t)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(t)
    assert not direct(fake)
    assert torch.vmap(lambda x: torch.tensor(float(direct(x))))(torch.zeros(3, 2)).tolist() == [0.0] * 3


def test_flash_attn_same_result_with_or_without_the_dispatcher(monkeypatch):
    """Under a dispatch mode the mode sees both ops and the numbers are those of the direct call; a plain
    call never reaches the registered ops (here replaced by ones that fail)."""
    import ioattn.ops.attention as ops

    torch.manual_seed(0)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q, k, v = (torch.randn(1, 40, 2, 32, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    recorder = _Recorder()
    with recorder:
        out = ioattn.flash_attn_func(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert any("ioattn.flash_attn_fwd" in op for op in recorder.ops), recorder.ops
    assert any("ioattn.flash_attn_bwd" in op for op in recorder.ops), recorder.ops

    def unreachable(*args):
        raise AssertionError("the custom op was dispatched in a plain eager call")

    monkeypatch.setattr(ops.flash_attn_fwd, "op", unreachable)
    monkeypatch.setattr(ops.flash_attn_bwd, "op", unreachable)
    out_direct = ioattn.flash_attn_func(q, k, v, causal=True)
    grads_direct = torch.autograd.grad(out_direct, (q, k, v), dout)
    torch.testing.assert_close(out, out_direct, atol=0, rtol=0)
    for g, gd in zip(grads, grads_direct, strict=True):
        torch.testing.assert_close(g, gd, atol=1e-5, rtol=1e-5)
