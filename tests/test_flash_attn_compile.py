"""torch.compile(fullgraph=True) of a small transformer block that calls ioattn.flash_attn_func, forward and
backward, against the same block run eagerly. On CPU the kernels run in Triton's interpreter inside the
compiled graph (the custom op is opaque to Inductor; register_fake gives it shapes)."""

import pytest
import torch
from conftest import DEVICE, ON_GPU

import ioattn


class Block(torch.nn.Module):
    def __init__(self, dim, nheads, nheads_k):
        super().__init__()
        self.nheads, self.nheads_k, self.headdim = nheads, nheads_k, dim // nheads
        self.norm1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (nheads + 2 * nheads_k) * self.headdim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x, dropout_p: float = 0.0):
        b, s, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, s, self.nheads + 2 * self.nheads_k, self.headdim)
        # q, k, v are strided views of the projection: the kernels read them in place.
        q, k, v = qkv.split([self.nheads, self.nheads_k, self.nheads_k], dim=2)
        attn = ioattn.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        x = x + self.proj(attn.reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16] if ON_GPU else [torch.float32])
def test_compiled_block_matches_eager_forward_and_backward(dtype):
    torch.manual_seed(0)
    dim, nheads, nheads_k = (256, 4, 2) if ON_GPU else (64, 2, 1)
    block = Block(dim, nheads, nheads_k).to(device=DEVICE, dtype=dtype)
    x = torch.randn(2, 37, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="inductor")

    out_eager = block(x)
    grads_eager = torch.autograd.grad(out_eager.sum(), [x, *block.parameters()])
    out_comp = compiled(x)
    grads_comp = torch.autograd.grad(out_comp.sum(), [x, *block.parameters()])

    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    err = (out_comp - out_eager).abs().max().item()
    print(f"compiled vs eager: out {err:.3e}")
    assert err <= tol * out_eager.abs().max().item()
    for ge, gc in zip(grads_eager, grads_comp, strict=True):
        assert (gc - ge).abs().max().item() <= tol * (ge.abs().max().item() + 1)


def test_compiled_dropout_draws_a_fresh_seed_each_call():
    """The seed is drawn inside the op at run time, not baked into the graph at trace time."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 16, 2, 32, device=DEVICE, dtype=torch.float16) for _ in range(3))
    # Inductor's CPU build costs ~30 s; aot_eager runs the same trace and fake-tensor path on CPU.
    fn = torch.compile(lambda q, k, v: ioattn.flash_attn_func(q, k, v, dropout_p=0.5), fullgraph=True,
                       backend="inductor" if ON_GPU else "aot_eager")
    a, b = fn(q, k, v), fn(q, k, v)
    assert not torch.equal(a, b)
    torch.manual_seed(7)
    c = fn(q, k, v)
    torch.manual_seed(7)
    assert torch.equal(c, fn(q, k, v))


def test_dynamic_shapes_compile_once_across_lengths():
    """torch.compile(dynamic=True) of a call with dropout, forward and backward, over three sequence lengths:
    what the first length compiled serves the others (the ops' fakes take symbolic lengths), and the values
    without dropout equal the eager call's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from ioattn.backend import select_backend

    if select_backend(torch.device(DEVICE)) != "triton":
        pytest.skip("the chunked path's Python loop over chunks specialises on the length")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    plain = torch.compile(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=True), dynamic=True,
                          fullgraph=True, backend=counter)
    drop = torch.compile(lambda q, k, v: ioattn.flash_attn_func(q, k, v, causal=True, dropout_p=0.2), dynamic=True,
                         fullgraph=True, backend=counter)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    for s in (33, 48, 80):  # none equal to a static size (duck sizing would tie them)
        q, k, v = (torch.randn(2, s, 2, 32, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
        out = plain(q, k, v)
        ref = ioattn.flash_attn_func(q, k, v, causal=True)
        assert torch.equal(out, ref)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.float().sum(), (q, k, v))
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r)  # dQ summed by atomics on the GPU: last bits may differ
        dropped = drop(q, k, v)
        assert dropped.shape == q.shape
        torch.autograd.grad(dropped.float().sum(), (q, k, v))
        if s == 33:
            compiled = counter.frame_count
    assert counter.frame_count == compiled  # no recompile for another length
