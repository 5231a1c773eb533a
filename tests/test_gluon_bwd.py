"""The Gluon Hopper backward (kernels/attn_bwd_gluon.py) through the public functions, against
attention_ref.

Each case checks that the Gluon kernel ran (or, for what it does not take, that it did not), then the
gradients by the suite's rule: max error at most 3x PyTorch's in the inputs' dtype, plus a floor.
GPU-only: the kernel needs sm_90 (TMA, wgmma).
"""

import pytest
import torch
from conftest import ON_GPU

if not ON_GPU:
    pytest.skip("the Gluon backward needs a CUDA device (sm_90)", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip(f"the Gluon backward needs sm_90, got {torch.cuda.get_device_capability()}",
                allow_module_level=True)

from test_flash_attn import _grads, _qkv, _varlen_case, check_against_ref, check_varlen_grads  # noqa: E402

import ioattn  # noqa: E402
from ioattn.dropout import call_seed, draw_seed, dropout_keep_mask  # noqa: E402
from ioattn.kernels import launch  # noqa: E402


@pytest.fixture
def gluon_calls(monkeypatch):
    """Opts in to the Gluon backward at every head dim it has; the list of its launches made while the
    test runs."""
    monkeypatch.setenv("IOATTN_GLUON_BWD", "1")
    monkeypatch.setattr(launch._BWD_PLANS, "enabled", False)  # every backward of the test takes the whole path
    calls = []
    real = launch.gluon_backward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "gluon_backward", spy)
    return calls


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim): odd lengths (partial query and key blocks),
# seqlen_q != seqlen_k both ways, MHA / GQA / MQA, a single key, a single query.
SHAPES = [
    (2, 1025, 1025, 4, 4, 64),
    (1, 2048, 2048, 4, 1, 128),
    (2, 333, 1027, 8, 2, 128),
    (1, 1027, 200, 4, 2, 64),
    (3, 1, 77, 4, 4, 128),
    (2, 130, 1, 2, 1, 64),
]
OPTS = [{}, {"causal": True}, {"window_size": (100, 30)}, {"window_size": (-1, 64)},
        {"softcap": 5.0}, {"window_size": (100, 30), "softcap": 8.0}, {"alibi": True},
        {"causal": True, "softcap": 8.0, "alibi": True}, {"window_size": (100, 30), "alibi": True},
        # narrow bands: most steps have a consumer half no query sees (it skips its products)
        {"window_size": (0, 0)}, {"window_size": (10, -1)}]


def _case(shape, opts, dtype=torch.bfloat16, seed=None):
    """q, k, v of (batch, seqlen_q, seqlen_k, nheads, nheads_k, d) (the generator seeded with ``seed``, by
    default the shape's sum) and the call's options, with ``alibi`` (True or "batch": (batch, nheads) slopes;
    "heads": (nheads,)) and ``dropout`` (p, and the forward's mask for the reference) spelled out."""
    torch.manual_seed(sum(shape) if seed is None else seed)
    q, k, v = _qkv(*shape, dtype)
    opts = dict(opts)
    alibi = opts.pop("alibi", False)
    assert alibi in (False, True, "heads", "batch")
    if alibi:
        lead = (shape[3],) if alibi == "heads" else (shape[0], shape[3])
        opts["alibi_slopes"] = torch.rand(*lead, device="cuda") * 0.3 + 0.05
    p = opts.pop("dropout", 0.0)
    if p:
        torch.manual_seed(1234)
        opts.update(dropout_p=p, seed=1234,
                    dropout_mask=dropout_keep_mask(draw_seed("cuda"), shape[0], shape[3], shape[1], shape[2], p,
                                                   "cuda"))
    return q, k, v, opts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", OPTS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gluon_backward(shape, opts, dtype, gluon_calls):
    q, k, v, opts = _case(shape, opts, dtype, seed=sum(shape) + len(opts))
    check_against_ref(q, k, v, **opts)
    assert len(gluon_calls) == 1, "the Gluon backward did not run"


def test_gluon_backward_rows_without_keys(gluon_calls):
    """Causal with seqlen_q > seqlen_k: the first rows see no key (lse -inf): zero gradient, never NaN."""
    torch.manual_seed(3)
    q, k, v = _qkv(2, 300, 100, 4, 2, 128, torch.bfloat16)
    _, _, (dq, _, _) = check_against_ref(q, k, v, causal=True)
    assert gluon_calls
    assert (dq[:, :200] == 0).all()


@pytest.mark.parametrize("lens", [([0, 37, 1, 500, 0, 129], [3, 41, 1, 0, 9, 200]),
                                  ([1300, 2, 700], [1100, 64, 900])], ids=lambda x: str(x[0]))
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_backward_varlen(lens, causal, gluon_calls):
    """Each packed sequence against attention_ref on that sequence alone; empty sequences and tiles that
    run into the next sequence's rows."""
    torch.manual_seed(len(lens[0]))
    lens_q, lens_k = lens
    dtype = torch.bfloat16
    q, k, v, cu_q, cu_k = _varlen_case(lens_q, lens_k, 4, 2, 128, dtype)
    out = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    assert gluon_calls
    check_varlen_grads(q, k, v, cu_q, cu_k, dout, grads, causal)


@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"window_size": (100, 30), "softcap": 8.0},
                                  {"causal": True, "alibi": True}, {"deterministic": True}], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], (1, 1024, 1024, 2, 2, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gluon_backward_dropout(shape, opts, gluon_calls):
    """The forward's dropout mask drawn again in the S^T layout: against attention_ref with that mask."""
    p = 0.17
    q, k, v, opts = _case(shape, {**opts, "dropout": p}, seed=sum(shape) + len(opts))
    check_against_ref(q, k, v, **opts)
    assert len(gluon_calls) == 1 and gluon_calls[0]["dropout_p"] == p


# deterministic=True: the key blocks take turns on each dQ block, last first. Windows (key blocks whose
# range starts after the first query block, or ends before the last), GQA (turns per query head), rows
# without keys, and rows of 160 key blocks (more programs than an H200 has SMs: a program waits only
# on programs launched before it); the wide kernel (d = 256) too.
DETERMINISTIC_CASES = [
    ((2, 1025, 1025, 4, 4, 64), {"causal": True}),
    ((1, 777, 2048, 8, 2, 128), {"window_size": (300, 40)}),
    ((2, 1500, 700, 4, 1, 128), {"causal": True, "softcap": 5.0, "alibi": True}),
    ((1, 333, 1027, 4, 2, 64), {"window_size": (-1, 64)}),
    ((1, 300, 20480, 1, 1, 64), {}),
    ((2, 1025, 1025, 4, 2, 256), {"causal": True}),
    ((1, 777, 2048, 4, 4, 256), {"window_size": (300, 40), "softcap": 5.0}),
    ((1, 200, 10240, 1, 1, 256), {}),
]


@pytest.mark.parametrize("shape,opts", DETERMINISTIC_CASES, ids=str)
def test_gluon_backward_deterministic(shape, opts, gluon_calls):
    """Against attention_ref, and bitwise equal gradients over repeated calls."""
    q, k, v, opts = _case(shape, dict(opts, deterministic=True))
    _, _, grads = check_against_ref(q, k, v, **opts)
    assert gluon_calls and all(c["deterministic"] for c in gluon_calls)
    out = ioattn.flash_attn_func(q, k, v, **opts)
    dout = torch.randn_like(out)
    first = _grads(out, (q, k, v), dout)
    for _ in range(10):
        out = ioattn.flash_attn_func(q, k, v, **opts)
        for a, b in zip(first, _grads(out, (q, k, v), dout), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_backward_deterministic_varlen(causal, d, gluon_calls):
    """Varlen: each sequence's key blocks take turns on its own dQ blocks (empty sequences included)."""
    torch.manual_seed(5)
    lens_q, lens_k = [0, 37, 1, 1500, 0, 129], [3, 41, 1, 0, 900, 1200]
    q, k, v, cu_q, cu_k = _varlen_case(lens_q, lens_k, 4, 2, d, torch.bfloat16)
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    out = ioattn.flash_attn_varlen_func(*args, causal=causal, deterministic=True)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    assert gluon_calls and all(c["deterministic"] for c in gluon_calls)
    check_varlen_grads(q, k, v, cu_q, cu_k, dout, grads, causal)
    for _ in range(5):
        out = ioattn.flash_attn_varlen_func(*args, causal=causal, deterministic=True)
        for a, b in zip(grads, _grads(out, (q, k, v), dout), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("env", [None, "0", "1"])
def test_gluon_backward_routing(env, monkeypatch):
    """By default (and with =1) the Gluon backward takes d = 64, 128 and 256 (where it measured faster), causal
    softcap, ALiBi and dropout at d = 256 included; =0 nothing."""
    if env is None:
        monkeypatch.delenv("IOATTN_GLUON_BWD", raising=False)
    else:
        monkeypatch.setenv("IOATTN_GLUON_BWD", env)
    monkeypatch.setattr(launch._BWD_PLANS, "enabled", False)
    calls = []
    real = launch.gluon_backward
    monkeypatch.setattr(launch, "gluon_backward", lambda *a, **kw: calls.append(a[1].shape[-1]) or real(*a, **kw))
    for d, opts in ((64, {}), (128, {}), (128, {"softcap": 5.0}), (64, {"causal": True}),
                    (64, {"causal": True, "window_size": (100, -1)}), (128, {"causal": True, "softcap": 5.0}),
                    (64, {"causal": True, "softcap": 5.0}), (256, {"deterministic": True}), (256, {"dropout_p": 0.1}),
                    (256, {"alibi_slopes": torch.full((2,), 0.1, device="cuda")}),
                    (256, {"causal": True, "softcap": 5.0})):
        q, k, v = _qkv(1, 256, 256, 2, 2, d, torch.bfloat16)
        ioattn.flash_attn_func(q, k, v, **opts).sum().backward()
    wide = [256, 256, 256, 256]
    every = [64, 128, 128, 64, 64, 128, 64, *wide]
    assert calls == {None: every, "0": [], "1": every}[env]


# The last wave's key blocks split over their steps (dense, no window, not deterministic), forced on small
# shapes by pretending the device has five SMs (and on at d = 64, where the shipped configs leave it off):
# pieces that cross GQA heads and end mid-head, a partial last key block and query block, and each of the
# step's paths (softcap, ALiBi, dropout).
TAIL_CASES = [
    ((1, 2048, 2048, 4, 1, 128), {}),
    ((2, 2100, 1100, 4, 2, 64), {}),
    ((2, 1500, 1000, 4, 2, 128), {"softcap": 5.0, "alibi": True}),
    ((1, 1100, 700, 8, 2, 64), {"softcap": 5.0}),
    ((1, 1024, 2000, 4, 1, 128), {"dropout": 0.17}),
]


def _check_case(shape, opts):
    """A case (``_case``, bf16) against the reference, forward and backward."""
    q, k, v, opts = _case(shape, opts)
    check_against_ref(q, k, v, **opts)


@pytest.mark.parametrize("shape,opts", TAIL_CASES, ids=str)
def test_gluon_backward_tail_split(shape, opts, gluon_calls, monkeypatch):
    from ioattn.kernels import attn_bwd_gluon

    splits = []
    real_split = attn_bwd_gluon.tail_split
    real_select = attn_bwd_gluon.select_config
    monkeypatch.setattr(attn_bwd_gluon, "select_config", lambda *a: real_select(*a)._replace(tail=1))
    monkeypatch.setattr(attn_bwd_gluon, "_num_sms", lambda device: 5)
    monkeypatch.setattr(attn_bwd_gluon, "tail_split", lambda *a: splits.append(real_split(*a)) or splits[-1])
    _check_case(shape, opts)
    assert len(gluon_calls) == 1 and splits and splits[0] > 1, splits


# Dense inputs at d <= 128 convert dQ under the attention kernel's last wave (dq_convert_kernel, launched with
# programmatic dependent launch, waiting on per-(batch, KV head) counts of finished programs). Cases: the tail
# split's weighted counts (d = 128 GQA on five SMs; d = 64 ships without the split), causal and windows
# (programs with no query steps), and shapes of several waves on the real SM count, where the conversion
# overlaps the kernel.
UNDER_WAVE_CASES = [
    ((2, 1025, 1025, 4, 4, 64), {}, 5),
    ((1, 700, 900, 8, 2, 128), {}, 5),
    ((2, 333, 1027, 8, 2, 128), {"causal": True}, None),
    ((1, 1100, 700, 6, 2, 64), {"window_size": (300, 40)}, None),
    ((2, 300, 2000, 4, 4, 128), {"window_size": (0, 0)}, None),
    ((2, 4096, 4096, 8, 8, 128), {}, None),
    ((4, 2048, 2048, 16, 4, 64), {"causal": True}, None),
]


@pytest.mark.parametrize("shape,opts,sms", UNDER_WAVE_CASES, ids=str)
def test_gluon_backward_dq_under_wave(shape, opts, sms, gluon_calls, monkeypatch):
    """With and without the conversion under the last wave: bitwise equal gradients in the deterministic
    order, and the same gradients within rounding in the free one."""
    from ioattn.kernels import attn_bwd_gluon

    if sms is not None:
        monkeypatch.setattr(attn_bwd_gluon, "_num_sms", lambda device: sms)
    torch.manual_seed(sum(shape))
    q, k, v = _qkv(*shape, torch.bfloat16)
    results = {}
    for under in (False, True):
        monkeypatch.setattr(attn_bwd_gluon, "DQ_CONVERT_UNDER_WAVE", under)
        for det in (True, False):
            out = ioattn.flash_attn_func(q, k, v, deterministic=det, **opts)
            torch.manual_seed(7)
            results[under, det] = _grads(out, (q, k, v), torch.randn_like(out))
            assert (gluon_calls[-1]["dq"] is not None) == under
    for a, b in zip(results[False, True], results[True, True], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(results[True, True], results[True, False], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_gluon_backward_in_a_cuda_graph(gluon_calls):
    """A forward and backward captured in a CUDA graph and replayed: the dQ conversion under the last wave is a
    programmatic dependent launch, which a capture records as such."""
    torch.manual_seed(11)
    q, k, v = _qkv(2, 1024, 1024, 8, 4, 128, torch.bfloat16)
    dout = torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        out = ioattn.flash_attn_func(q, k, v, causal=True)
        return _grads(out, (q, k, v), dout)

    want = step()
    assert gluon_calls and gluon_calls[-1]["dq"] is not None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    for _ in range(2):
        for g in got:
            g.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


# A band's consumers walk their steps in two nested loops (the group's heads, then query blocks) or in one flat
# loop (d = 128 softcap and dropout ship it; forced here both ways on every kind of band): GQA, unequal lengths,
# the deterministic order, softcap, dropout and ALiBi.
NESTED_CASES = [
    ((2, 700, 900, 8, 2, 64), {"causal": True}),
    ((1, 1100, 700, 6, 2, 128), {"window_size": (300, 40), "deterministic": True}),
    ((2, 500, 500, 4, 1, 64), {"window_size": (64, 64), "softcap": 5.0}),
    ((1, 600, 900, 4, 2, 128), {"causal": True, "dropout": 0.17}),
    ((2, 333, 500, 4, 2, 128), {"window_size": (90, 10), "alibi": True}),
]


@pytest.mark.parametrize("nested", [0, 1])
@pytest.mark.parametrize("shape,opts", NESTED_CASES, ids=str)
def test_gluon_backward_step_loops(shape, opts, nested, gluon_calls, monkeypatch):
    from ioattn.kernels import attn_bwd_gluon

    real_select = attn_bwd_gluon.select_config
    monkeypatch.setattr(attn_bwd_gluon, "select_config", lambda *a: real_select(*a)._replace(nested=nested))
    _check_case(shape, opts)
    assert len(gluon_calls) == 1


# The wide kernel (d = 256: dK, dV split along the head dim, S^T and dP^T along the queries): odd lengths,
# seqlen_q != seqlen_k both ways, GQA and MQA, a single query and a single key, in both 16-bit dtypes.
WIDE_SHAPES = [
    (2, 1025, 1025, 4, 4, 256),
    (2, 333, 1027, 8, 2, 256),
    (1, 1027, 200, 4, 1, 256),
    (3, 1, 77, 2, 2, 256),
    (2, 130, 1, 2, 1, 256),
]
WIDE_OPTS = [{}, {"causal": True}, {"window_size": (100, 30)}, {"window_size": (-1, 64)}, {"softcap": 5.0},
             {"window_size": (100, 30), "softcap": 8.0}, {"window_size": (0, 0)}, {"window_size": (10, -1)},
             {"causal": True, "softcap": 5.0}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", WIDE_OPTS, ids=str)
@pytest.mark.parametrize("shape", WIDE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gluon_backward_wide(shape, opts, dtype, gluon_calls):
    torch.manual_seed(sum(shape) + len(opts))
    q, k, v = _qkv(*shape, dtype)
    check_against_ref(q, k, v, **opts)
    assert len(gluon_calls) == 1, "the Gluon backward did not run"


@pytest.mark.parametrize("causal", [False, True])
def test_gluon_backward_wide_varlen(causal, gluon_calls):
    """d = 256 varlen: each packed sequence against attention_ref alone (empty sequences; tiles running into
    the next sequence's rows, whose dQ rows the kernel must leave alone)."""
    torch.manual_seed(7)
    lens_q, lens_k = [0, 37, 1, 500, 0, 129], [3, 41, 1, 0, 9, 200]
    q, k, v, cu_q, cu_k = _varlen_case(lens_q, lens_k, 4, 2, 256, torch.bfloat16)
    out = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    assert gluon_calls
    check_varlen_grads(q, k, v, cu_q, cu_k, dout, grads, causal)


# The wide kernel's ALiBi (the bias on every step) and dropout (the forward's mask drawn for each warpgroup's
# query rows): every shape, with causal, a window and softcap; per-head and per-batch slopes.
WIDE_BIAS_OPTS = [{"alibi": "heads"}, {"causal": True, "alibi": "batch"},
                  {"window_size": (100, 30), "softcap": 8.0, "alibi": "batch"}]
WIDE_DROPOUT_OPTS = [{}, {"causal": True}, {"window_size": (100, 30), "softcap": 8.0},
                     {"causal": True, "alibi": "batch"}, {"deterministic": True}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", WIDE_BIAS_OPTS, ids=str)
@pytest.mark.parametrize("shape", WIDE_SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_gluon_backward_wide_alibi(shape, opts, dtype, gluon_calls):
    q, k, v, opts = _case(shape, opts, dtype, seed=sum(shape) + len(opts))
    check_against_ref(q, k, v, **opts)
    assert len(gluon_calls) == 1, "the wide kernel did not run"


@pytest.mark.parametrize("opts", WIDE_DROPOUT_OPTS, ids=str)
@pytest.mark.parametrize("shape", WIDE_SHAPES[:3] + [(1, 1024, 1024, 2, 2, 256)], ids=lambda s: "x".join(map(str, s)))
def test_gluon_backward_wide_dropout(shape, opts, gluon_calls):
    """Against attention_ref with the forward's mask: the wide kernel draws the same mask as the forward."""
    opts = {**opts, "dropout": 0.17}
    q, k, v, opts = _case(shape, opts, seed=sum(shape) + len(opts))
    check_against_ref(q, k, v, **opts)
    assert len(gluon_calls) == 1 and gluon_calls[0]["dropout_p"] == 0.17


@pytest.mark.parametrize("causal", [False, True])
def test_gluon_backward_wide_varlen_alibi_dropout(causal, gluon_calls):
    """d = 256 varlen with per-sequence ALiBi slopes and dropout: each packed sequence against attention_ref
    with its slopes and its part of the mask (the sequence's batch index is its Philox plane)."""
    torch.manual_seed(9)
    lens_q, lens_k = [0, 37, 1, 500, 129], [3, 41, 1, 300, 200]
    nheads, p = 4, 0.17
    q, k, v, cu_q, cu_k = _varlen_case(lens_q, lens_k, nheads, 2, 256, torch.bfloat16)
    slopes = torch.rand(len(lens_q), nheads, device="cuda") * 0.3 + 0.05
    torch.manual_seed(1234)
    out = ioattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=p, causal=causal,
                                        alibi_slopes=slopes)
    torch.manual_seed(1234)
    seed = draw_seed("cuda")
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    assert len(gluon_calls) == 1 and gluon_calls[0]["dropout_p"] == p

    def ref_opts(b):
        mask = dropout_keep_mask(seed, len(lens_q), nheads, max(lens_q), max(lens_k), p, "cuda", batch_index=b,
                                 q_len=lens_q[b], k_len=lens_k[b])
        return dict(alibi_slopes=slopes[b:b + 1], dropout_p=p, dropout_mask=mask)

    check_varlen_grads(q, k, v, cu_q, cu_k, dout, grads, causal, ref_opts)


# Plans: a dense backward (no ALiBi, not deterministic) records its launches; the next backward like it makes
# its buffers and launches them (``launch.gluon_backward_planned``, which the op's backward tries first).
# d = 64, 128 and the wide kernel at 256, causal, a window, softcap, dropout, and the last wave's split (the
# device pretends to have 5 SMs, so the plan holds the split and the sum of its pieces).
BWD_PLAN_CASES = [
    ((2, 1025, 1025, 4, 4, 64), {}), ((1, 2048, 2048, 4, 1, 128), {"causal": True}),
    ((2, 333, 1027, 8, 2, 128), {"window_size": (100, 30)}), ((2, 700, 700, 4, 2, 128), {"softcap": 5.0}),
    ((2, 1025, 1025, 4, 4, 256), {"causal": True}), ((1, 1024, 2000, 4, 1, 128), {"dropout": 0.17}),
    ((1, 1000, 1100, 4, 2, 256), {"dropout": 0.17}),
    ((1, 2048, 2048, 4, 1, 128), {"sms": 5}),
]


def _op_pass(q, k, v, dout, opts, seed):
    """The op's forward, then its backward on dout: (out, lse, (dq, dk, dv)), with the forward's seed."""
    from ioattn.ops import attention

    causal = opts.get("causal", False)
    left, right = opts.get("window_size", (-1, 0 if causal else -1))
    scale = q.shape[-1] ** -0.5
    args = (q.shape[1], k.shape[1], scale, left, right, opts.get("softcap", 0.0), None, opts.get("dropout", 0.0))
    torch.manual_seed(seed)
    seed_t = call_seed(q, args[-1])
    out, lse = attention._flash_attn_fwd(q, k, v, None, None, *args, seed_t)
    return out, lse, seed_t, args


def _planned_bwd(dout, q, k, v, out, lse, prob_args, seed):
    """The op's planned backward for these arguments (``seed``: the forward's seed tensor): its key, then the
    plan's launches (None: no plan)."""
    prob = launch.make_problem(q, k, *prob_args)
    key = launch.backward_plan_key(dout, q, k, v, out, lse, prob)
    return launch.gluon_backward_planned(key, dout, q, k, v, out, lse, prob, seed if prob.dropout_p > 0 else None)


@pytest.mark.parametrize("shape,opts", BWD_PLAN_CASES, ids=str)
def test_backward_plan_matches_the_whole_path(shape, opts, monkeypatch):
    """No key for a shape's first backward; the second records a plan; the next backward like those goes
    through it, on new tensors: dK and dV bit for bit what the whole path gives for them, dQ (summed by reduce-adds
    in any order) to its last bits; another length finds no plan."""
    from ioattn.kernels import attn_bwd_gluon
    from ioattn.ops import attention

    if "sms" in opts:
        real_select = attn_bwd_gluon.select_config
        monkeypatch.setattr(attn_bwd_gluon, "select_config", lambda *a: real_select(*a)._replace(tail=1))
        monkeypatch.setattr(attn_bwd_gluon, "_num_sms", lambda device: opts["sms"])
    torch.manual_seed(sum(shape))
    for i in range(3):
        q, k, v = _qkv(*shape, torch.bfloat16)
        out, lse, seed_t, args = _op_pass(q, k, v, None, opts, 100)  # one dropout seed: one plan key
        dout = torch.randn_like(out)
        prob_args = (None, *args[:5], args[5], args[7])
        if i < 2:  # the op's backward: no key for the shape's first call, the second records the plan
            attention._flash_attn_bwd(dout, q, k, v, out, lse, None, None, *args, seed_t, False)
            assert len(launch._BWD_PLANS) == i
    planned = _planned_bwd(dout, q, k, v, out, lse, prob_args, seed_t)
    assert planned is not None
    prob = launch.make_problem(q, k, *prob_args)
    dq, dk, dv = launch.attn_bwd(dout, q, k, v, out, lse, None, None, None, prob, seed_t)
    assert torch.equal(planned[1], dk) and torch.equal(planned[2], dv)
    assert (planned[0].float() - dq.float()).abs().max() <= 1e-2 * dq.float().abs().max()
    q2, k2, v2 = _qkv(shape[0], shape[1] + 1, shape[2] + 1, *shape[3:], torch.bfloat16)
    out2, lse2, seed2, args2 = _op_pass(q2, k2, v2, None, opts, 7)
    for _ in range(2):  # no key for the new shape's first call, then a key with no plan
        assert _planned_bwd(torch.randn_like(out2), q2, k2, v2, out2, lse2, (None, *args2[:5], args2[5], args2[7]),
                            seed2) is None


def test_backward_plan_on_a_side_stream():
    """A recorded backward plan launched on a side stream (while the default stream sleeps) gives dK and dV
    bit for bit as the whole path on the default stream: its buffers and launches follow the current stream."""
    from ioattn.ops import attention

    torch.manual_seed(9)
    q, k, v = _qkv(2, 1000, 1000, 4, 2, 128, torch.bfloat16)
    out, lse, seed_t, args = _op_pass(q, k, v, None, {"causal": True}, 3)
    dout = torch.randn_like(out)
    prob_args = (None, *args[:5], args[5], args[7])
    for _ in range(2):
        whole = attention._flash_attn_bwd(dout, q, k, v, out, lse, None, None, *args, seed_t, False)
    whole = [t.float().cpu() for t in whole]
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # the default stream busy for tens of ms: work queued behind it is late
    with torch.cuda.stream(side):
        planned = _planned_bwd(dout, q, k, v, out, lse, prob_args, 0)
        host = None if planned is None else [t.float().cpu() for t in planned]  # waits for the side stream only
    assert not torch.cuda.current_stream().query(), "the sleep ended first: the stream check proves nothing"
    torch.cuda.synchronize()
    assert host is not None
    assert torch.equal(host[1], whole[1]) and torch.equal(host[2], whole[2])
    assert (host[0] - whole[0]).abs().max() <= 1e-2 * whole[0].abs().max()


def test_backward_plan_declines_what_it_cannot_take(monkeypatch):
    """With a plan recorded: dO off by 2 bytes (same shape and strides), dO without unit d-stride,
    IOATTN_GLUON_BWD=0, IOATTN_GLUON=0, a patched config and the fast launch off find none; the op's backward
    then gives the right gradients by the whole path."""
    from ioattn.kernels import attn_bwd_gluon, fastlaunch
    from ioattn.ops import attention

    torch.manual_seed(5)
    q, k, v = _qkv(2, 512, 512, 4, 2, 128, torch.bfloat16)
    out, lse, seed_t, args = _op_pass(q, k, v, None, {}, 1)
    dout = torch.randn_like(out)
    prob_args = (None, *args[:5], args[5], args[7])
    for _ in range(2):
        attention._flash_attn_bwd(dout, q, k, v, out, lse, None, None, *args, seed_t, False)
    assert _planned_bwd(dout, q, k, v, out, lse, prob_args, 0) is not None
    buf = torch.empty(dout.numel() + 1, dtype=dout.dtype, device="cuda")
    dout_off = buf[1:].view(dout.shape).copy_(dout)
    assert dout_off.data_ptr() % 16 and dout_off.stride() == dout.stride()
    assert _planned_bwd(dout_off, q, k, v, out, lse, prob_args, 0) is None
    dout_t = dout.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, d-stride != 1
    assert _planned_bwd(dout_t, q, k, v, out, lse, prob_args, 0) is None
    whole = attention._flash_attn_bwd(dout_t, q, k, v, out, lse, None, None, *args, seed_t, False)
    planned = _planned_bwd(dout, q, k, v, out, lse, prob_args, 0)
    assert torch.equal(whole[1], planned[1]) and torch.equal(whole[2], planned[2])
    monkeypatch.setenv("IOATTN_GLUON_BWD", "0")
    assert _planned_bwd(dout, q, k, v, out, lse, prob_args, 0) is None
    monkeypatch.delenv("IOATTN_GLUON_BWD")
    monkeypatch.setenv("IOATTN_GLUON", "0")
    assert _planned_bwd(dout, q, k, v, out, lse, prob_args, 0) is None
    monkeypatch.delenv("IOATTN_GLUON")
    monkeypatch.setattr(fastlaunch, "_ENABLED", False)
    assert _planned_bwd(dout, q, k, v, out, lse, prob_args, 0) is None
    monkeypatch.undo()
    assert _planned_bwd(dout, q, k, v, out, lse, prob_args, 0) is not None
    real_select = attn_bwd_gluon.select_config
    monkeypatch.setattr(attn_bwd_gluon, "select_config", lambda *a: real_select(*a)._replace(stages=3))
    assert _planned_bwd(dout, q, k, v, out, lse, prob_args, 0) is None
