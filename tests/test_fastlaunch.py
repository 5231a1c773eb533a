"""The direct launch path (``ioattn.kernels.fastlaunch``): a compiled kernel is reused only for arguments
that Triton would specialise the same way, and the host helpers agree with Triton's."""

import pytest
import torch
import triton
import triton.language as tl

from ioattn.backend import interpreting
from ioattn.kernels import fastlaunch
from ioattn.kernels.fastlaunch import Launcher, cdiv, next_power_of_2

CUDA = torch.cuda.is_available() and not interpreting()


def test_host_helpers_match_triton():
    for n in range(1, 3000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
    for a in range(0, 300, 7):
        for b in (1, 2, 16, 64, 129):
            assert cdiv(a, b) == triton.cdiv(a, b)


def test_arg_specs_key_what_triton_specialises():
    """Leading descriptors are keyed by dtype, block shape, layout and padding; every other argument by
    Triton's own specialisation, also where a descriptor comes after other arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from ioattn.kernels.fastlaunch import TmaDesc, arg_specs

    t = torch.zeros(64, 64)
    desc = TmaDesc(t, (64, 64), (64, 1), (16, 64), None)

    def spec(a):
        return native_specialize_impl(BaseBackend, a, False, True, True)

    plain = (t, t.view(-1)[1:], 1, 16, 17, 2.5, None)
    assert arg_specs(plain) == ((), tuple(spec(a) for a in plain))
    assert arg_specs((desc, *plain)) == (((torch.float32, (16, 64), id(None), "zero"),), tuple(map(spec, plain)))
    assert arg_specs((desc, *plain)) != arg_specs((desc._replace(block_shape=(32, 64)), *plain))
    assert arg_specs((desc, *plain)) != arg_specs((desc._replace(padding="nan"), *plain))
    assert arg_specs((desc, 16)) != arg_specs((desc, 17)) != arg_specs((desc, 1))
    later = arg_specs((t, desc, 16))
    assert later == (spec(t), (torch.float32, (16, 64), id(None), "zero"), spec(16))
    assert later != arg_specs((t.view(-1)[1:], desc, 16))


def test_expand_matches_tritons_descriptor_arguments():
    """A descriptor of a kernel that lowered it to pointers expands as Triton's driver expands its own."""
    pytest.importorskip("triton.backends.nvidia.driver")
    from triton.backends.nvidia.driver import make_tensordesc_arg

    from ioattn.kernels.fastlaunch import TmaDesc, _expand

    t = torch.zeros(64, 64)
    for padding in ("zero", "nan"):
        desc = TmaDesc(t, (64, 48), (64, 1), (16, 64), None, padding)
        assert _expand(desc, None) == make_tensordesc_arg(desc, None)


@pytest.mark.parametrize("with_meta", [True, False])
def test_direct_launch_passes_what_tritons_launcher_passes(monkeypatch, with_meta):
    """Three descriptors between other arguments: the C launch function gets from ``_call_direct`` exactly
    the arguments Triton's ``CudaLauncher`` and descriptor wrapper give it (a stand-in for the C function and
    for the CUtensorMap maker, so this runs without a GPU); a launcher needing scratch is not taken."""
    from types import SimpleNamespace

    import triton.runtime

    nvidia = pytest.importorskip("triton.backends.nvidia.driver")
    from ioattn.kernels.fastlaunch import TmaDesc, _call_direct, _direct_launch

    def fill(*a):
        return ("tensor map", a)

    monkeypatch.setattr(fastlaunch, "_fill_tma", fill)
    fake_driver = SimpleNamespace(utils=SimpleNamespace(fill_tma_descriptor=fill))
    monkeypatch.setattr(triton.runtime.driver, "_active", fake_driver)
    t = torch.zeros(64, 64)
    args = (TmaDesc(t, (64, 48), (64, 1), (16, 64), None), 7, TmaDesc(t, (32, 64), (128, 1), (8, 32), None, "nan"),
            t, TmaDesc(t, (64, 64), (64, 1), (64, 64), None), 2.5)
    signature = {"a": "tensordesc<bf16[16,64]>", "n": "i32", "b": "tensordesc<fp16[8,32]>", "p": "*fp32",
                 "c": "tensordesc<bf16[64,64]>", "x": "fp32", "BLOCK": "constexpr"}
    metas = [dict(swizzle=128, elem_size=2, elem_type=t_, block_size=[16, 64], fp4_padded=False)
             for t_ in (10, 9, 8)] if with_meta else []
    calls = []
    run = object.__new__(nvidia.CudaLauncher)
    run.__dict__.update(launch=nvidia.wrap_handle_tensordesc(lambda *a: calls.append(a), signature, metas),
                        num_ctas=1, global_scratch_size=0, profile_scratch_size=0, global_scratch_align=1,
                        profile_scratch_align=1, launch_cooperative_grid=False, launch_pdl=True)
    kernel = SimpleNamespace(run=run, function=1234, packed_metadata=(4, 1, 0))
    tail = (64,)
    run(3, 2, 1, 99, kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
    _call_direct(_direct_launch(kernel, args), 3, 2, 1, 99, args, tail)
    assert len(calls) == 2
    assert calls[0] == calls[1]
    run.global_scratch_size = 16
    assert _direct_launch(kernel, args) is None


@triton.jit
def _axpy_kernel(X, Y, n, stride, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs * stride, mask=mask)
    tl.store(Y + offs, x * alpha + 1.0, mask=mask)


def test_interpreter_falls_back():
    """Under the interpreter (CI) there is no compiled kernel: every launch takes ``kernel[grid]``."""
    if not interpreting():
        pytest.skip("interpreter only")
    launcher = Launcher(_axpy_kernel)
    assert not launcher.direct
    x = torch.arange(40, dtype=torch.float32)
    y = torch.empty(40)
    launcher((1,), x, y, 40, 1, 2.0, BLOCK=64)
    torch.testing.assert_close(y, x * 2 + 1)
    assert not launcher.compiled


@pytest.mark.skipif(not CUDA, reason="compiled Triton on a CUDA device")
def test_specialisations_get_their_own_kernels():
    """n = 1 (a constant), n divisible by 16, n not; unit and other strides; a 16-byte aligned and an
    unaligned pointer: each variant gets the kernel Triton compiles for it, and a repeated variant with new
    data reuses its kernel."""
    launcher = Launcher(_axpy_kernel)
    base = torch.randn(4096, device="cuda")
    variants = [(base, 1, 1), (base, 16, 1), (base, 17, 1), (base, 33, 3), (base[1:], 48, 1), (base[1:], 1, 2),
                (base, 1000, 2)]
    for x, n, stride in variants:
        for alpha in (2.0, -0.5):
            y = torch.full((n,), float("nan"), device="cuda")
            launcher((cdiv(n, 64),), x, y, n, stride, alpha, BLOCK=64)
            torch.testing.assert_close(y, x[: n * stride: stride] * alpha + 1)
    keys = list(launcher.compiled)
    assert len(keys) == len({(n == 1, n % 16 == 0, s == 1, s % 16 == 0, x.data_ptr() % 16 == 0)
                             for x, n, s in variants})
    # The same variants again, with fresh data: no new kernels.
    for x, n, stride in variants:
        x = x.clone() if x.data_ptr() % 16 == 0 else torch.randn(4097, device="cuda")[1:]
        y = torch.empty(n, device="cuda")
        launcher((cdiv(n, 64),), x, y, n, stride, 3.0, BLOCK=64)
        torch.testing.assert_close(y, x[: n * stride: stride] * 3 + 1)
    assert list(launcher.compiled) == keys


def _attention_calls():
    """Forward and deterministic backward of dense and varlen inputs (several shapes, so that launches hit
    the cache with new descriptor shapes and strides), and decode over contiguous and paged caches."""
    import ioattn

    results = []
    for shape, causal in (((2, 300, 4, 128), True), ((1, 517, 4, 128), False), ((2, 300, 8, 64), True)):
        for _ in range(2):  # the first call of a shape may compile; the second launches directly
            q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            out = ioattn.flash_attn_func(q, k, v, causal=causal, deterministic=True)
            out.backward(torch.ones_like(out))
            results += [out.detach(), q.grad, k.grad, v.grad]
    cu = torch.tensor([0, 100, 101, 357], device="cuda", dtype=torch.int32)
    for _ in range(2):
        q, k, v = (torch.randn(357, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        out = ioattn.flash_attn_varlen_func(q, k, v, cu, cu, 256, 256, causal=True, deterministic=True)
        out.backward(torch.ones_like(out))
        results += [out.detach(), q.grad, k.grad, v.grad]
    for _ in range(2):
        kc, vc = (torch.randn(4, 2048, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        qd = torch.randn(4, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
        lens = torch.tensor([1, 700, 2048, 1500], device="cuda", dtype=torch.int32)
        results.append(ioattn.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=lens))
        table = torch.randperm(4 * 128, device="cuda", dtype=torch.int32).view(4, 128)
        pages = (kc.view(-1, 16, 2, 128)[table.flatten().argsort()], vc.view(-1, 16, 2, 128)[table.flatten().argsort()])
        results.append(ioattn.flash_attn_with_kvcache(qd, *pages, cache_seqlens=lens, block_table=table))
    return results


@pytest.mark.skipif(not CUDA, reason="compiled Triton on a CUDA device")
def test_direct_and_triton_paths_agree(monkeypatch):
    """The same bits through the cached kernels as through Triton's own launch path
    (``IOATTN_FAST_LAUNCH=0``), for the attention forward, the deterministic backward and decode."""
    runs = []
    for fast in (True, False):
        monkeypatch.setattr(fastlaunch, "_ENABLED", fast)
        torch.manual_seed(0)
        runs.append(_attention_calls())
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="compiled Triton on a CUDA device")
def test_library_launches_call_tritons_launcher_directly():
    """Every kernel the attention calls launched took the compiled C launcher itself (descriptors expanded
    by ``_expand``), none fell back to ``kernel.run``."""
    import importlib

    _attention_calls()
    launchers = [obj for name in ("kernels.attn_fwd_gluon", "kernels.attn_bwd_gluon", "kernels.launch",
                                  "kernels.decode_gluon", "ops.decode")
                 for obj in vars(importlib.import_module(f"ioattn.{name}")).values() if isinstance(obj, Launcher)]
    entries = [entry for launcher in launchers for entry in launcher.compiled.values()]
    assert len(entries) >= 6
    assert all(entry[3] is not None for entry in entries)
