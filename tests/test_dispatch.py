"""Plain eager calls run the launchers directly; anything that must see the custom ops still does."""

import types

import pytest
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


def test_inference_calls_skip_autograd_with_the_same_numbers(monkeypatch):
    """Without a derivative to record (no grad mode, or no input requiring grad) the forward op runs without
    the autograd.Function: same output and lse, nothing attached to autograd. A forward-AD level still takes
    the Function (which refuses forward mode, as before)."""
    import torch.autograd.forward_ad as fwAD

    import ioattn.ops.attention as ops

    torch.manual_seed(1)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q, k, v = (torch.randn(2, 33, 2, 32, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    out, lse, _ = ioattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.requires_grad
    applied = []
    real_apply = ops.FlashAttnFunction.apply
    monkeypatch.setattr(ops.FlashAttnFunction, "apply", lambda *a: applied.append(1) or real_apply(*a))
    for plain in (lambda t: t.detach(), lambda t: t):
        with torch.no_grad() if plain(q) is q else torch.enable_grad():
            out2, lse2, _ = ioattn.flash_attn_func(plain(q), plain(k), plain(v), causal=True,
                                                   return_attn_probs=True)
        assert not out2.requires_grad and out2.grad_fn is None
        torch.testing.assert_close(out2, out.detach(), atol=0, rtol=0)
        torch.testing.assert_close(lse2, lse, atol=0, rtol=0)
    assert not applied
    with torch.inference_mode():
        ioattn.flash_attn_func(q.detach(), k.detach(), v.detach())
    assert not applied
    with fwAD.dual_level():
        dual = fwAD.make_dual(q.detach(), torch.ones_like(q))
        try:
            ioattn.flash_attn_func(dual, k.detach(), v.detach())
        except (NotImplementedError, RuntimeError):
            pass
    assert applied


def test_launch_plans_decline_cpu_tensors(monkeypatch):
    """Launch plans (recorded by dense Gluon calls on a GPU) never take CPU tensors: no key is made for them,
    so the op's forward and backward take their whole paths."""
    from ioattn.kernels import attn_fwd_gluon, launch

    q = torch.randn(1, 8, 2, 64)
    assert attn_fwd_gluon.forward_plan_key(q, q, q, 0.125, (-1, -1), 0.0, 0.0) is None
    lse = torch.zeros(1, 2, 8)
    prob = launch.make_problem(q, q, None, 8, 8, 0.125, -1, -1, 0.0, 0.0)
    assert launch.backward_plan_key(q, q, q, q, q, lse, prob) is None
    if DEVICE == "cpu":
        out = ioattn.flash_attn_func(q.requires_grad_(), q, q, causal=True)
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()


def test_plan_table_sightings_and_limits():
    """A plan table marks shapes seen (a key is worth making from a shape's second call on), forgets seen
    shapes and plans when full (a plan already held is replaced in place), and ``set_plans`` switches every
    table and empties it."""
    from ioattn.kernels import attn_fwd_gluon, fastlaunch, launch

    states = [(t, t.enabled) for t in fastlaunch._TABLES]
    table = fastlaunch.PlanTable("IOATTN_TEST_PLANS_UNSET", size=3)
    try:
        assert table.enabled and len(table) == 0
        assert not table.sighted(("a",)) and table.sighted(("a",)) and table.sighted(("a",))
        for shapes in ("b", "c"):
            assert not table.sighted((shapes,))
        assert not table.sighted(("d",))  # the map was full: it starts again from d
        assert not table.sighted(("a",)) and table.sighted(("d",))
        table.put(("a",), "plan a")
        assert table.get(("a",)) == "plan a" and table.get(("b",)) is None
        for key in ("b", "c"):
            table.put((key,), key)
        table.put(("a",), "plan a2")  # held: replaced, nothing dropped
        assert len(table) == 3 and table.get(("a",)) == "plan a2"
        table.put(("d",), "d")  # a new key in a full table: it starts again
        assert len(table) == 1 and table.get(("d",)) == "d"
        fastlaunch.set_plans(False)
        assert not table.enabled and len(table) == 0 and not table.sighted(("d",))
        assert not attn_fwd_gluon._FWD_PLANS.enabled and not launch._BWD_PLANS.enabled
        fastlaunch.set_plans(True)
        assert table.enabled and attn_fwd_gluon._FWD_PLANS.enabled and launch._BWD_PLANS.enabled
    finally:
        fastlaunch._TABLES.remove(table)
        for t, enabled in states:
            t.enabled = enabled


def test_plan_helpers():
    """``aligned`` checks every given pointer (None: absent); ``recorded`` keeps launches only when every
    launcher found a compiled kernel, ``replayable`` only when every launcher is on the direct path."""
    from ioattn.kernels import fastlaunch

    buf = torch.zeros(64, dtype=torch.float16)
    assert fastlaunch.aligned(buf, None, buf[8:]) and not fastlaunch.aligned(buf, buf[1:])
    assert fastlaunch.aligned()

    class Fake:
        def __init__(self, entries, direct=True):
            self.entries, self.direct = entries, direct

        def entry(self, args, constexprs):
            return self.entries.get((args, tuple(constexprs.items())))

        def direct_ok(self):
            return self.direct

    a, b = Fake({((1,), (("X", 2),)): "ka"}), Fake({((3,), ()): "kb"})
    made = ((a, (4,), {"X": 2}, "build a", (1,)), (b, (5, 6), {}, "build b", (3,)))
    assert fastlaunch.recorded(made) == ((a, "ka", (4,), "build a"), (b, "kb", (5, 6), "build b"))
    assert fastlaunch.recorded((made[0], (b, (5,), {}, "build b", (7,)))) is None
    launches = fastlaunch.recorded(made)
    assert fastlaunch.replayable(launches)
    # PlanTable.ready: a plan under the key, aligned tensors and every launcher on the direct path
    table = fastlaunch.PlanTable("IOATTN_TEST_PLANS_UNUSED")
    try:
        plan = types.SimpleNamespace(launches=launches)
        table.put(("k",), plan)
        assert table.ready(("k",), (buf, None)) is plan
        assert table.ready(None, (buf,)) is None and table.ready(("other",), (buf,)) is None
        assert table.ready(("k",), (buf[1:],)) is None
        # PlanTable.keep: records only with a key, aligned tensors and every launch compiled
        table.keep(("kept",), (buf,), made, lambda launches: ("plan", launches))
        assert table.get(("kept",)) == ("plan", launches)
        table.keep(("odd",), (buf[1:],), made, lambda launches: ("plan", launches))
        table.keep(None, (buf,), made, lambda launches: ("plan", launches))
        table.keep(("none",), (buf,), (made[0], (b, (5,), {}, "build b", (7,))), lambda launches: ("plan", launches))
        assert table.get(("odd",)) is None and table.get(("none",)) is None and len(table) == 2
        b.direct = False
        assert not fastlaunch.replayable(launches)
        assert table.ready(("k",), (buf,)) is None
    finally:
        fastlaunch._TABLES.remove(table)


@pytest.mark.parametrize("varlen", [False, True])
def test_deterministic_algorithms_switch_picks_the_deterministic_backward(monkeypatch, varlen):
    """``torch.use_deterministic_algorithms(True)`` makes the backward the deterministic one, as PyTorch's own
    ops follow that switch; without it the call's ``deterministic`` argument decides."""
    import ioattn.ops.attention as attention

    seen = []
    real = attention.flash_attn_bwd.fn

    def spy(*args):
        seen.append(args[-1])  # the op's last argument: deterministic
        return real(*args)

    monkeypatch.setattr(attention.flash_attn_bwd, "fn", spy)
    q, k, v = (torch.randn(2, 24, 2, 16, device=DEVICE, dtype=torch.float16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 24, 48], dtype=torch.int32, device=DEVICE)

    def call():
        if varlen:
            return ioattn.flash_attn_varlen_func(*(t.flatten(0, 1) for t in (q, k, v)), cu, cu, 24, 24, causal=True)
        return ioattn.flash_attn_func(q, k, v, causal=True)

    call().sum().backward()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        call().sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen == [False, True]
