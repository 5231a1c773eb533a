"""The dropout keep mask: Philox bit-exact with Triton's tl.randint4x, the documented grid function,
the kernels' tile helper equal to it, sub-blocks consistent with the whole grid, the kept fraction right."""

import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from ioattn.dropout import counters_per_row, draw_seed, dropout_keep_mask, keep_threshold, philox4x32, rng_state
from ioattn.kernels.common import dropout_keep, dropout_keep_t, philox, philox_grid


@triton.jit
def _tl_words_kernel(out_ptr, offset_ptr, seed, n, BLOCK: tl.constexpr, N_ROUNDS: tl.constexpr,
                     OURS: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    offset = tl.load(offset_ptr + idx, mask=inside, other=0)
    if OURS:  # the kernels' Philox (mul.wide products), always PHILOX_ROUNDS
        r0, r1, r2, r3 = philox(seed, offset)
    else:
        r0, r1, r2, r3 = tl.randint4x(seed, offset, N_ROUNDS)
    tl.store(out_ptr + idx * 4, r0.to(tl.int64) & 0xFFFFFFFF, mask=inside)
    tl.store(out_ptr + idx * 4 + 1, r1.to(tl.int64) & 0xFFFFFFFF, mask=inside)
    tl.store(out_ptr + idx * 4 + 2, r2.to(tl.int64) & 0xFFFFFFFF, mask=inside)
    tl.store(out_ptr + idx * 4 + 3, r3.to(tl.int64) & 0xFFFFFFFF, mask=inside)


def _tl_words(seed: int, offset: torch.Tensor, n_rounds: int = 7, ours: bool = False) -> torch.Tensor:
    out = torch.full((*offset.shape, 4), -1, dtype=torch.int64, device=offset.device)
    _tl_words_kernel[(triton.cdiv(offset.numel(), 256),)](out, offset, seed, offset.numel(), BLOCK=256,
                                                          N_ROUNDS=n_rounds, OURS=ours)
    return out


@triton.jit
def _tile_mask_kernel(out_ptr, seed, bh, max_seqlen_q, max_seqlen_k, row0, col0, dropout_p,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr):
    base, stride = philox_grid(bh, max_seqlen_q, max_seqlen_k)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    if TRANSPOSED:  # the dK/dV kernels' (keys, queries) tile
        keep = tl.trans(dropout_keep_t(seed, base, rows, cols, stride, dropout_p))
    else:
        keep = dropout_keep(seed, base, rows, cols, stride, dropout_p)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(out_ptr + offs, keep.to(tl.int8))


@pytest.mark.parametrize("impl", ["tl.randint4x-7", "tl.randint4x-10", "kernels"])
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 + 7, 2**32 + 3, 2**62 - 1, 3_141_592_653_589_793_238])
def test_philox_bit_exact_with_tl_randint4x(seed, impl):
    """The torch port against Triton's Philox (seven and ten rounds) and the kernels' own Philox."""
    gen = torch.Generator().manual_seed(seed % 1000)
    offset = torch.cat([
        torch.arange(0, 600),
        torch.arange(2**31 - 100, 2**31 + 100),  # int32 sign boundary of the low word
        torch.arange(2**32 - 150, 2**32 + 150),  # the high counter word starts counting
        torch.randint(2**32, 2**62, (400,), generator=gen),
        torch.tensor([2**63 - 1]),
    ]).to(device=DEVICE, dtype=torch.int64)
    n_rounds = 10 if impl == "tl.randint4x-10" else 7
    expected = _tl_words(seed, offset, n_rounds, ours=impl == "kernels")
    got = philox4x32(seed, offset, n_rounds)
    assert got.shape == (offset.numel(), 4)
    mismatched = int((got != expected).sum())
    print(f"seed {seed}: {mismatched} of {offset.numel()} differ")
    assert mismatched == 0
    assert int(got.min()) >= 0 and int(got.max()) < 2**32


def test_keep_threshold():
    assert keep_threshold(0.0) == 0
    assert keep_threshold(0.5) == 32768
    assert keep_threshold(0.1) == 6554  # float32(0.1) * 65536 = 6553.6000977
    assert keep_threshold(1 / 65536) == 1
    assert keep_threshold(0.999999) == 65536  # above every 16-bit value: nothing kept


def test_keep_mask_is_the_documented_grid_function():
    seed, batch, nheads, sq, sk, p = 77, 2, 3, 5, 70, 0.3
    mask = dropout_keep_mask(seed, batch, nheads, sq, sk, p, DEVICE)
    assert mask.shape == (batch, nheads, sq, sk) and mask.dtype == torch.bool
    assert counters_per_row(sk) == 12 and counters_per_row(64) == 8 and counters_per_row(1) == 4
    for b, h, i, j in [(1, 2, 4, 6), (0, 0, 0, 0), (1, 1, 3, 69), (0, 2, 2, 45)]:
        g, c, q, e = j // 32, (j % 32) // 8, (j % 8) // 2, j % 2
        counter = ((b * nheads + h) * sq + i) * 4 * math.ceil(sk / 32) + 4 * g + q
        word = int(_tl_words(seed, torch.tensor([counter], dtype=torch.int64, device=DEVICE))[0, c])
        u = (word >> (16 * e)) & 0xFFFF
        assert bool(mask[b, h, i, j]) == (u >= math.ceil(p * 65536)), (b, h, i, j)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("block", [(16, 32), (32, 64)])
def test_kernel_tile_helper_matches_the_grid(block, transposed):
    seed, batch, nheads, sq, sk, p = 2**40 + 9, 2, 3, 50, 100, 0.2
    full = dropout_keep_mask(seed, batch, nheads, sq, sk, p, DEVICE)
    bm, bn = block
    b, h, row0, col0 = 1, 2, 16, 32
    out = torch.zeros((bm, bn), dtype=torch.int8, device=DEVICE)
    _tile_mask_kernel[(1,)](out, seed, b * nheads + h, sq, sk, row0, col0, p, BLOCK_M=bm, BLOCK_N=bn,
                            TRANSPOSED=transposed)
    rows, cols = min(bm, sq - row0), min(bn, sk - col0)
    assert torch.equal(out[:rows, :cols].bool(), full[b, h, row0:row0 + rows, col0:col0 + cols])


def test_sub_blocks_match_the_whole_grid():
    seed, batch, nheads, sq, sk, p = draw_seed(DEVICE), 3, 2, 37, 53, 0.25
    full = dropout_keep_mask(seed, batch, nheads, sq, sk, p, DEVICE)
    block = dropout_keep_mask(seed, batch, nheads, sq, sk, p, DEVICE,
                              q_start=5, k_start=11, q_len=13, k_len=29)
    assert torch.equal(block, full[:, :, 5:18, 11:40])
    one = dropout_keep_mask(seed, batch, nheads, sq, sk, p, DEVICE, batch_index=2, q_start=30, k_start=40)
    assert torch.equal(one, full[2:3, :, 30:, 40:])


def test_kept_fraction_and_seed_dependence():
    p = 0.3
    a = dropout_keep_mask(123, 2, 4, 64, 256, p, DEVICE)
    assert not dropout_keep_mask(5, 1, 2, 8, 40, 0.999999, DEVICE).any()
    assert dropout_keep_mask(5, 1, 2, 8, 40, 0.0, DEVICE).all()
    n = a.numel()
    kept = float(a.float().mean())
    sigma = math.sqrt(p * (1 - p) / n)
    print(f"kept {kept:.5f}, expected {1 - p}, sigma {sigma:.2e}")
    assert abs(kept - (1 - p)) < 5 * sigma
    b = dropout_keep_mask(124, 2, 4, 64, 256, p, DEVICE)
    assert 0.3 < float((a != b).float().mean()) < 0.5  # independent masks differ in 2p(1-p) = 42%


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(5)
    s1 = draw_seed(DEVICE)
    torch.manual_seed(5)
    assert draw_seed(DEVICE) == s1
    assert 0 <= s1 < 2**62


def _reconstruct(s_dmask, v, p):
    """The output S_dmask's kept probabilities give: sum_j max(S, 0) / (1 - p) v_j (GQA heads expanded)."""
    v = v.repeat_interleave(s_dmask.shape[1] // v.shape[2], dim=2)
    return torch.einsum("bhts,bshd->bthd", s_dmask.double().clamp(min=0) / (1 - p), v.double())


@pytest.mark.parametrize("opts", [{"causal": True}, {"window_size": (5, 3), "softcap": 4.0, "alibi": True}],
                         ids=["causal", "window-softcap-alibi"])
def test_return_attn_probs_s_dmask(opts):
    """flash-attn's S_dmask: the probabilities before dropout, negative where the call dropped them (the seed
    the call drew, found again from the generator's state): they give the call's output back, the dropped
    share is p, and without dropout S_dmask is an empty tensor. Dense and varlen, GQA."""
    import ioattn
    from ioattn.reference import attention_probs

    torch.manual_seed(5)
    dt = torch.float16 if DEVICE == "cuda" else torch.float32
    b, sq, sk, h, hk, d, p = 2, 33, 41, 4, 2, 32, 0.25
    q = torch.randn(b, sq, h, d, device=DEVICE, dtype=dt)
    k, v = (torch.randn(b, sk, hk, d, device=DEVICE, dtype=dt) for _ in range(2))
    opts = dict(opts)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(b, h, device=DEVICE) * 0.3
    out, _, s = ioattn.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **opts)
    assert s.shape == (b, h, sq, sk) and s.dtype == dt
    torch.testing.assert_close(_reconstruct(s, v, p).float(), out.float(), atol=2e-3, rtol=2e-3)
    probs = attention_probs(q, k, **{key: val for key, val in opts.items()})
    live = probs > 1e-3
    assert abs((s[live] < 0).float().mean().item() - p) < 0.05
    torch.testing.assert_close(s.abs().float(), probs, atol=2e-3, rtol=1e-2)
    _, _, empty = ioattn.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    assert empty.shape == (0,)
    # varlen: sequence b's block at the top left of S_dmask[b]
    lens_q, lens_k = [7, 0, 20], [9, 5, 30]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], device=DEVICE, dtype=torch.int32)
                  for n in (lens_q, lens_k))
    qv = torch.randn(sum(lens_q), h, d, device=DEVICE, dtype=dt)
    kv, vv = (torch.randn(sum(lens_k), hk, d, device=DEVICE, dtype=dt) for _ in range(2))
    slopes = opts.pop("alibi_slopes", None)
    if slopes is not None:
        opts["alibi_slopes"] = torch.rand(3, h, device=DEVICE) * 0.3
    out, _, s = ioattn.flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=p,
                                              return_attn_probs=True, **opts)
    assert s.shape == (3, h, max(lens_q), max(lens_k))
    for i in range(3):
        q0, q1, k0, k1 = cu_q[i].item(), cu_q[i + 1].item(), cu_k[i].item(), cu_k[i + 1].item()
        block = s[i:i + 1, :, :q1 - q0, :k1 - k0]
        assert (s[i, :, q1 - q0:] == 0).all() and (s[i, :, :, k1 - k0:] == 0).all()
        if q1 > q0:
            torch.testing.assert_close(_reconstruct(block, vv[None, k0:k1], p)[0].float(), out[q0:q1].float(),
                                       atol=2e-3, rtol=2e-3)
            mods = {key: val[i:i + 1] if key == "alibi_slopes" else val for key, val in opts.items()}
            torch.testing.assert_close(block.abs().float(), attention_probs(qv[None, q0:q1], kv[None, k0:k1], **mods),
                                       atol=2e-3, rtol=1e-2)


def test_s_dmask_through_autograd_rows_without_keys_and_heads_slopes():
    """S_dmask on the autograd path (inputs that require grad), causal with seqlen_q > seqlen_k (rows that
    see no key: zeros), and (nheads,) ALiBi slopes in a varlen call."""
    import ioattn

    torch.manual_seed(8)
    dt = torch.float16 if DEVICE == "cuda" else torch.float32
    p = 0.3
    q = torch.randn(1, 40, 2, 32, device=DEVICE, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, 25, 2, 32, device=DEVICE, dtype=dt, requires_grad=True) for _ in range(2))
    out, _, s = ioattn.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    assert not s.requires_grad and (s[:, :, :15] == 0).all()
    torch.testing.assert_close(_reconstruct(s, v.detach(), p).float(), out.detach().float(), atol=2e-3, rtol=2e-3)
    out.sum().backward()  # the graph is intact
    cu = torch.tensor([0, 30, 40], device=DEVICE, dtype=torch.int32)
    qv, kv, vv = (t.detach()[0, :n].clone() for t, n in ((q, 40), (k, 25), (v, 25)))
    kv, vv = torch.cat([kv, kv[:15]]), torch.cat([vv, vv[:15]])
    out, _, s = ioattn.flash_attn_varlen_func(qv, kv, vv, cu, cu, 30, 30, dropout_p=p, return_attn_probs=True,
                                              alibi_slopes=torch.tensor([0.2, 0.05], device=DEVICE))
    torch.testing.assert_close(_reconstruct(s[:1], vv[None, :30], p)[0].float(), out[:30].float(), atol=2e-3,
                               rtol=2e-3)


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])  # test_shard's -k True
@pytest.mark.parametrize("path", ["kernels", "chunked"])
def test_activation_checkpointing_recomputes_the_same_mask(reentrant, path, monkeypatch):
    """``torch.utils.checkpoint`` reruns the forward in the backward: the seed comes from the device's
    generator, whose state checkpointing restores, so the rerun drops the same elements and the gradients equal those of
    the call without checkpointing, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    import ioattn

    dev = DEVICE if path == "kernels" else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if path == "chunked":
        monkeypatch.setenv("IOATTN_BACKEND", "chunked")

    def leaves():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(2, 40, 2, 32, generator=g).to(dev, dtype).requires_grad_() for _ in range(3)]

    def attend(q, k, v):
        return ioattn.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, deterministic=True)

    results = []
    for ckpt in (False, True):
        q, k, v = leaves()
        torch.manual_seed(5)
        out = checkpoint(attend, q, k, v, use_reentrant=reentrant) if ckpt else attend(q, k, v)
        torch.manual_seed(99)  # the generator moves between the forward and the backward
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device=dev)).sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("d", [64, 128])
def test_dropout_in_a_cuda_graph_draws_a_fresh_mask_each_replay(d):
    """A captured training step with dropout (forward and deterministic backward in one CUDA graph): each
    replay draws a fresh seed on the device, hence a fresh mask, and gives bit for bit what the same step gives
    eagerly from the generator's state before that replay (the backward regenerates the replay's mask)."""
    import ioattn

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 300, 4, d, device="cuda", dtype=torch.bfloat16)

    def step(q, k, v):
        out = ioattn.flash_attn_func(q, k, v, dropout_p=0.2, causal=True, deterministic=True)
        return out, torch.autograd.grad(out, (q, k, v), dout)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles and plans
        for _ in range(2):
            step(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step(q, k, v)
    outs = []
    for _ in range(3):
        state = rng_state("cuda")
        graph.replay()
        got = (static[0].clone(), *(g.clone() for g in static[1]))
        assert not torch.equal(state, rng_state("cuda"))  # the replay moved the device's generator
        torch.cuda.set_rng_state(state)
        out, grads = step(q, k, v)
        for a, b in zip(got, (out, *grads), strict=True):
            assert torch.equal(a, b)
        outs.append(got[0])
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_dropout_fresh_under_compile_reduce_overhead():
    """torch.compile(mode="reduce-overhead") with dropout, in inference and in training: every step drops a
    fresh mask (never one replayed), each equal to the eager call's from the same generator state; without
    dropout the captured call gives the eager result."""
    import ioattn

    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 128, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for grad in (False, True):  # the forward op alone, and the autograd Function (its seed tensor saved)
        qg = q.clone().requires_grad_(grad)
        fn = torch.compile(lambda q, k, v: ioattn.flash_attn_func(q, k, v, dropout_p=0.2), mode="reduce-overhead")
        outs = []
        for _ in range(5):
            state = rng_state("cuda")
            with torch._inductor.config.patch(fallback_random=True):  # the seed drawn by torch.randint, as eager
                out = fn(qg, k, v).detach().clone()
            torch.cuda.set_rng_state(state)
            assert torch.equal(out, ioattn.flash_attn_func(q, k, v, dropout_p=0.2))
            outs.append(out)
        assert all(not torch.equal(a, b) for a, b in zip(outs[:-1], outs[1:], strict=True))
    plain = torch.compile(lambda q, k, v: ioattn.flash_attn_func(q, k, v), mode="reduce-overhead")
    outs = [plain(q, k, v).clone() for _ in range(4)]
    torch.testing.assert_close(outs[-1], ioattn.flash_attn_func(q, k, v))


def test_call_seed_draws_on_the_inputs_device():
    """A call's seed: None without dropout (no generator moves); with it a (1,) int64 tensor on the inputs'
    device from that device's generator, the value ``draw_seed`` reads from a generator at the state before the
    call; ``kernel_seed`` passes such a tensor on and copies an int to the device; the torch port of Philox
    takes the tensor as it takes the int."""
    from ioattn.dropout import call_seed, generator_at, kernel_seed

    t = torch.zeros(1, device=DEVICE)
    torch.manual_seed(3)
    state = rng_state(DEVICE)
    assert call_seed(t, 0.0) is None and torch.equal(state, rng_state(DEVICE))
    seed = call_seed(t, 0.1)
    assert seed.shape == (1,) and seed.dtype == torch.int64 and seed.device == t.device
    assert not torch.equal(state, rng_state(DEVICE))
    assert int(seed) == draw_seed(DEVICE, generator_at(state, DEVICE))
    torch.manual_seed(3)
    assert torch.equal(call_seed(t, 0.1), seed)
    assert kernel_seed(seed, 0.1, t.device) is seed and kernel_seed(seed, 0.0, t.device) == 0
    copied = kernel_seed(int(seed), 0.1, t.device)
    assert torch.equal(copied, seed) and copied.device == t.device
    offs = torch.arange(2**32 - 20, 2**32 + 20, device=DEVICE)
    assert torch.equal(philox4x32(seed, offs), philox4x32(int(seed), offs))


def test_two_equal_dropout_calls_stay_two_under_compile():
    """Two dropout calls with equal arguments draw two seeds, hence two masks, compiled too (a seed drawn
    inside an op that looks pure let torch.compile merge the calls into one), forward and backward."""
    import ioattn

    torch.manual_seed(0)
    dt = torch.float16 if DEVICE == "cuda" else torch.float32
    q, k, v = (torch.randn(1, 64, 2, 32, device=DEVICE, dtype=dt, requires_grad=True) for _ in range(3))

    def twice(q, k, v):
        return (ioattn.flash_attn_func(q, k, v, dropout_p=0.5, deterministic=True)
                - ioattn.flash_attn_func(q, k, v, dropout_p=0.5, deterministic=True))

    for fn in (twice, torch.compile(twice, backend="aot_eager", fullgraph=True)):
        diff = fn(q, k, v)
        assert diff.abs().max() > 0.1
        (grad,) = torch.autograd.grad(diff.float().sum(), q)
        assert grad.abs().max() > 0
        with torch.no_grad():
            assert fn(q, k, v).abs().max() > 0.1


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("empty", [False, True], ids=["full", "empty"])
def test_fake_outputs_match_the_real_ones(p, empty):
    """The forward and backward ops' fakes (what torch.compile plans with) give the real outputs' shapes,
    strides, dtypes and devices, with and without dropout, for empty inputs too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ioattn.dropout import call_seed
    from ioattn.ops.attention import flash_attn_bwd, flash_attn_fwd

    dt = torch.float16 if DEVICE == "cuda" else torch.float32
    sq = 0 if empty else 33
    q = torch.randn(2, sq, 4, 32, device=DEVICE, dtype=dt)
    k, v = (torch.randn(2, 40, 2, 32, device=DEVICE, dtype=dt) for _ in range(2))
    seed = call_seed(q, p)
    fwd_args = (q, k, v, None, None, sq, 40, 32 ** -0.5, -1, 0, 0.0, None, p, seed)
    out, lse = flash_attn_fwd.op(*fwd_args)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, None, None, sq, 40, 32 ** -0.5, -1, 0, 0.0, None, p, seed,
                True)
    real = (out, lse, *flash_attn_bwd.op(*bwd_args))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_in = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in fwd_args]
        fake = flash_attn_fwd.op(*fake_in)
        fake_bwd = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bwd_args]
        fake = (*fake, *flash_attn_bwd.op(*fake_bwd))
    for r, f in zip(real, fake, strict=True):
        assert (f.shape, f.stride(), f.dtype, f.device) == (r.shape, r.stride(), r.dtype, r.device)


def test_s_dmask_on_meta_tensors():
    """return_attn_probs with dropout on meta tensors (shape inference): S_dmask has its shape (meta tensors
    have no generator to redraw the seed from)."""
    import ioattn

    q, k, v = (torch.empty(2, 16, 2, 32, device="meta") for _ in range(3))
    out, lse, s = ioattn.flash_attn_func(q, k, v, dropout_p=0.1, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 16) and s.shape == (2, 2, 16, 16)
