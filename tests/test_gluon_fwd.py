"""The Gluon Hopper forward (kernels/attn_fwd_gluon.py) against attention_ref.

Tolerance rule: our max error against the float64 reference is at most 2x PyTorch's error doing the
same math in the inputs' dtype, plus a floor. GPU-only: the kernel needs sm_90 (TMA, wgmma).
"""

import math

import pytest
import torch
from conftest import ON_GPU

from ioattn.dropout import dropout_keep_mask
from ioattn.reference import attention_ref
from ioattn.testing import OUT_FACTOR, tolerance_check

if not ON_GPU:
    pytest.skip("the Gluon forward needs a CUDA device (sm_90)", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip(f"the Gluon forward needs sm_90, got {torch.cuda.get_device_capability()}",
                allow_module_level=True)

from test_flash_attn import check_against_ref, with_alibi_slopes  # noqa: E402

from ioattn.kernels.attn_fwd_gluon import (  # noqa: E402
    _CONFIGS,
    _ROUTED_HEAD_DIMS,
    FwdConfig,
    _softcap_mode,
    gluon_forward,
    gluon_forward_supported,
)

FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _window(causal, window_size):
    if window_size is not None:
        return window_size
    return (-1, 0) if causal else (-1, -1)


def _poison(nbytes):
    """NaN-fill a block the caching allocator will hand out next, so unwritten output elements show."""
    torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")


def _compare(out, lse, ref_out, ref_lse, base_out, base_lse, dtype):
    """out (b, sq, h, d), lse (b, h, sq) against the float64 and same-dtype references."""
    results = [tolerance_check(o, r, b, factor=OUT_FACTOR, floor=FLOOR[dtype], name=n)
               for o, r, b, n in ((out, ref_out, base_out, "out"), (lse, ref_lse, base_lse, "lse"))]
    for r in results:
        print(r)
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
    has_key = torch.isfinite(ref_lse)  # (b, h, sq): rows with at least one allowed key
    assert torch.equal(torch.isinf(lse), ~has_key), "lse -inf rows differ from the reference"
    assert torch.isfinite(out).all(), "non-finite output"
    empty = ~has_key.transpose(1, 2)  # (b, sq, h)
    assert (out[empty] == 0).all(), "rows with no key must give output 0"


def _check(q, k, v, causal=False, overlap=None, window_size=None, softcap=0.0, alibi_slopes=None, config=None):
    scale = 1.0 / math.sqrt(q.shape[-1])
    window = _window(causal, window_size)
    mods = dict(window_size=window, softcap=softcap, alibi_slopes=alibi_slopes)
    routed = gluon_forward_supported(q, k, v, dropout_p=0.0, softmax_scale=scale, **mods)
    assert routed == (q.shape[-1] in _ROUTED_HEAD_DIMS)
    _poison(q.numel() * q.element_size())
    out, lse = gluon_forward(q, k, v, scale, window, softcap, alibi_slopes, config=config, overlap=overlap)
    ref_out, ref_lse = attention_ref(q, k, v, **mods)
    base_out, base_lse = attention_ref(q, k, v, upcast=False, **mods)
    _compare(out, lse, ref_out, ref_lse, base_out, base_lse, q.dtype)
    return out, lse


def _qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype):
    q = torch.randn(batch, seqlen_q, nheads, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, seqlen_k, nheads_k, d, device="cuda", dtype=dtype)
    v = torch.randn(batch, seqlen_k, nheads_k, d, device="cuda", dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen", [1, 17, 128, 1000, 1025, 4096])
def test_square(seqlen, causal, d, dtype):
    batch = 2 if seqlen <= 1025 else 1
    _check(*_qkv(batch, seqlen, seqlen, 4, 4, d, dtype), causal)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", [(17, 17), (1025, 1025), (300, 17), (129, 2000)])
def test_overlap_variant(seqlens, causal, d):
    """The overlapped loop (QK^T of block j+1 during the softmax of block j), off by default."""
    _check(*_qkv(2, *seqlens, 4, 4, d, torch.bfloat16), causal, overlap=True)


# (seqlen_q, seqlen_k): bottom-right causal; sq > sk leaves the first sq - sk rows without keys.
@pytest.mark.parametrize("seqlens", [(1, 1000), (17, 300), (300, 17), (1000, 129), (513, 2048), (128, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_seqlen_q_ne_k(seqlens, causal, d):
    _check(*_qkv(2, *seqlens, 4, 4, d, torch.bfloat16), causal)


@pytest.mark.parametrize("nheads_k", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(nheads_k, causal):
    _check(*_qkv(2, 333, 517, 8, nheads_k, 128, torch.bfloat16), causal)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_qkv_strides(d, causal):
    qkv = torch.randn(3, 777, 3, 6, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)  # each (3, 777, 6, d) with strides (777*18d, 18d, d, 1)
    _check(q, k, v, causal)


def test_large_batch_heads():
    _check(*_qkv(4, 2048, 2048, 16, 16, 128, torch.bfloat16), True)


def test_deterministic():
    q, k, v = _qkv(2, 1025, 1025, 4, 2, 128, torch.bfloat16)
    slopes = torch.rand(4, device="cuda") * 0.3
    a, la = gluon_forward(q, k, v, 0.125, (100, 0), 10.0, slopes)
    b, lb = gluon_forward(q, k, v, 0.125, (100, 0), 10.0, slopes)
    assert torch.equal(a, b) and torch.equal(la, lb)


# Sliding windows, bottom-right aligned: (left, right) with -1 unbounded; blocks outside the band are
# skipped, blocks crossing its edges masked. (0, 0) and short windows over sq > sk leave rows without keys.
WINDOWS = [(0, 0), (3, 1), (64, 0), (127, 128), (200, 200), (-1, 5), (130, -1), (1000, 2), (5, 1000)]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("seqlens", [(17, 17), (1025, 1025), (300, 2000), (2000, 300)], ids=str)
def test_window(seqlens, window):
    torch.manual_seed(sum(seqlens) + window[0])
    _check(*_qkv(2, *seqlens, 4, 2, 128, torch.bfloat16), window_size=window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [
    {"softcap": 5.0}, {"softcap": 30.0, "causal": True}, {"softcap": 2.0, "window_size": (50, 7)},
    {"alibi": "heads"}, {"alibi": "batch_heads", "causal": True}, {"alibi": "heads", "window_size": (90, 0)},
    {"softcap": 8.0, "alibi": "batch_heads", "window_size": (300, 20)},
], ids=str)
@pytest.mark.parametrize("seqlens", [(1, 1), (129, 129), (1025, 1000), (77, 1500)], ids=str)
def test_score_mods(seqlens, opts, dtype):
    torch.manual_seed(seqlens[0])
    batch, nheads = 2, 4
    q, k, v = _qkv(batch, *seqlens, nheads, 2, 128, dtype)
    _check(q, k, v, **with_alibi_slopes(opts, batch, nheads))


@pytest.mark.parametrize("opts", [
    {"window_size": (3, 1)}, {"window_size": (130, -1)}, {"window_size": (200, 200), "softcap": 5.0},
    {"alibi": "batch_heads", "causal": True}, {"softcap": 30.0, "alibi": "heads", "window_size": (90, 0)},
], ids=str)
@pytest.mark.parametrize("seqlens", [(17, 17), (1025, 1000), (300, 2000), (2000, 300)], ids=str)
@pytest.mark.parametrize("d", [64, 256])
def test_features_other_head_dims(seqlens, opts, d):
    """d=64 (one warpgroup, 64 rows) and d=256 (64-key blocks) run their own tiles: the feature paths again
    at those shapes (softcap 5 takes the held max, 30 the online one with ALiBi)."""
    torch.manual_seed(seqlens[1])
    batch, nheads = 2, 4
    q, k, v = _qkv(batch, *seqlens, nheads, 1, d, torch.bfloat16)
    _check(q, k, v, **with_alibi_slopes(opts, batch, nheads))


@pytest.mark.parametrize("opts", [{"causal": True}, {"window_size": (40, 3), "softcap": 6.0, "alibi": True}],
                         ids=str)
def test_overlap_variant_mods(opts):
    q, k, v = _qkv(2, 700, 900, 4, 1, 128, torch.bfloat16)
    opts = dict(opts)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(4, device="cuda") * 0.5
    _check(q, k, v, overlap=True, **opts)


# The warp-specialised schedules at d=128 (two consumer warpgroups and a load warp), whether or not
# _CONFIGS ships one: free-running and ping-pong, with and without the intra-warpgroup overlap, one tile per
# program or persistent (which gluon_forward applies to dense inputs without a right window only), the
# dynamic schedule (dense inputs with a right window) and the bulk tensor store of the output (dense inputs
# with whole query tiles or one batch).
WS_CONFIGS = [FwdConfig(64, 128, 2, 4, schedule, overlap, persistent, dynamic, tma_store)
              for schedule, overlap, persistent, dynamic, tma_store in (
                  ("ws", True, False, False, False), ("pingpong", False, False, False, False),
                  ("pingpong", True, False, False, False), ("ws", True, True, False, False),
                  ("pingpong", False, True, False, False), ("pingpong", True, True, False, False),
                  ("pingpong", True, True, True, False), ("pingpong", True, True, True, True),
                  ("ws", True, False, True, True))]
# Chained tiles (FwdConfig.chain: the persistent static schedule, dense inputs without a right window; with
# one these configs take the dynamic schedule unchained): the ping-pong and free-running consumers, with
# and without the overlap, the bulk store.
CHAIN_CONFIGS = [FwdConfig(64, 128, 2, 4, schedule, overlap, True, True, tma_store, chain=True)
                 for schedule, overlap, tma_store in (("pingpong", True, False), ("pingpong", False, False),
                                                      ("ws", True, False), ("pingpong", True, True))]
# The chained static schedule over pairs of query blocks for causal-shaped inputs: ping-pong with the bulk
# store or not, free-running consumers.
PAIRED_CONFIGS = [CHAIN_CONFIGS[i]._replace(paired=True) for i in (0, 2, 3)]
WS_CONFIGS += CHAIN_CONFIGS
DYNAMIC_CONFIGS = [cfg for cfg in WS_CONFIGS if cfg.dynamic and not cfg.chain]  # causal: never chained


def _ws_id(cfg):
    flags = ("overlap", "persistent", "dynamic", "tma_store", "chain", "fixed_max", "alibi_sides", "paired")
    return "-".join([cfg.schedule] + [name.replace("_", "") for name in flags if getattr(cfg, name)])


@pytest.mark.parametrize("config", WS_CONFIGS, ids=_ws_id)
@pytest.mark.parametrize("case", [
    {"seqlens": (1, 1)}, {"seqlens": (17, 17), "causal": True}, {"seqlens": (1025, 1025), "causal": True},
    {"seqlens": (4096, 4096)}, {"seqlens": (300, 2000), "causal": True}, {"seqlens": (2000, 300), "causal": True},
    {"seqlens": (129, 2000)}, {"seqlens": (1000, 1000), "window_size": (127, 128)},
    {"seqlens": (1025, 1000), "window_size": (3, 1)}, {"seqlens": (2000, 300), "window_size": (0, 0)},
    {"seqlens": (777, 900), "softcap": 5.0, "alibi": "heads", "causal": True},
    {"seqlens": (513, 2048), "alibi": "batch_heads", "window_size": (300, 20), "softcap": 8.0},
    # Whole 64-row query tiles (the bulk store applies with two batches): a last tile half past the end,
    # tiles without keys (sq > sk), a two-sided window.
    {"seqlens": (1024, 1024), "causal": True}, {"seqlens": (576, 2000), "causal": True},
    {"seqlens": (2048, 576), "causal": True}, {"seqlens": (1024, 1024), "window_size": (100, 50)},
    {"seqlens": (640, 640), "batch": 1, "causal": True}, {"seqlens": (1000, 1000), "batch": 1, "causal": True},
], ids=str)
def test_warp_specialized(case, config):
    case = dict(case)
    torch.manual_seed(sum(case["seqlens"]))
    batch, nheads = case.pop("batch", 2), 4
    q, k, v = _qkv(batch, *case.pop("seqlens"), nheads, 2, 128, torch.bfloat16)
    alibi = case.pop("alibi", None)
    if alibi is not None:
        shape = (nheads,) if alibi == "heads" else (batch, nheads)
        case["alibi_slopes"] = torch.rand(shape, device="cuda") * 0.5 + 0.05
    _check(q, k, v, config=config, **case)


@pytest.mark.parametrize("config", DYNAMIC_CONFIGS, ids=_ws_id)
def test_dynamic_schedule(config):
    """The dynamic schedule's counter: left at zero after every launch (so the next launch on the stream
    starts from tile 0), one per stream, a fresh one under CUDA graph capture; the output does not depend on
    which program took a tile (bitwise equal over launches, streams and graph replays)."""
    from ioattn.kernels.attn_fwd_gluon import _tile_counter

    torch.manual_seed(3)
    # More tiles than SMs, so programs take tiles from the counter.
    q, k, v = _qkv(2, 2048, 2048, 8, 2, 128, torch.bfloat16)  # 256 tiles
    scale = 1 / math.sqrt(128)
    ref_out, ref_lse = _check(q, k, v, causal=True, config=config)
    for _ in range(3):
        out, lse = gluon_forward(q, k, v, scale, (-1, 0), config=config)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    torch.cuda.synchronize()
    assert _tile_counter(q.device).tolist() == [0, 0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, lse = gluon_forward(q, k, v, scale, (-1, 0), config=config)
        counter = _tile_counter(q.device)
    torch.cuda.synchronize()
    assert counter.data_ptr() != _tile_counter(q.device).data_ptr()
    assert counter.tolist() == [0, 0]
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gluon_forward(q, k, v, scale, (-1, 0), config=config)  # compiled, warm
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = gluon_forward(q, k, v, scale, (-1, 0), config=config)
    for _ in range(2):
        g_out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(g_out, ref_out) and torch.equal(g_lse, ref_lse)


VARLEN_LENS = [
    ([0, 37, 1, 5, 0, 12], [3, 41, 1, 0, 9, 12]),  # empty sequences both ways, seqlen_k 0 with queries
    ([0, 3000, 1, 517, 0, 64, 129], [5, 2900, 1, 600, 13, 64, 1000]),
    ([128, 256, 1, 1023], [128, 256, 1, 1023]),  # block-aligned starts and lengths
]


@pytest.mark.parametrize("opts", [
    {}, {"causal": True}, {"window_size": (5, 2), "alibi": True}, {"softcap": 4.0, "causal": True},
    {"window_size": (100, 0), "softcap": 10.0, "alibi": True},
], ids=str)
@pytest.mark.parametrize("lens", VARLEN_LENS, ids=lambda x: str(x[0]))
@pytest.mark.parametrize("d,config", [(128, None), (128, FwdConfig(64, 64, 2, 4, "single", True)), (64, None),
                                      (256, None),
                                      *((128, cfg) for cfg in WS_CONFIGS)],
                         ids=lambda x: str(x) if not isinstance(x, FwdConfig) else _ws_id(x))
def test_varlen(lens, opts, d, config):
    """Each packed sequence against attention_ref on that sequence alone (its own bottom-right alignment);
    the NaN-poisoned output shows any row the kernel skipped, and a store past a sequence's end would
    overwrite the next sequence's rows."""
    torch.manual_seed(8)
    lens_q, lens_k = lens
    nheads, nheads_k, dtype = 4, 2, torch.bfloat16
    batch = len(lens_q)
    q = torch.randn(sum(lens_q), nheads, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), nheads_k, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), nheads_k, d, device="cuda", dtype=dtype)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
                  for lens in (lens_q, lens_k))
    opts = dict(opts)
    slopes = torch.rand(batch, nheads, device="cuda") * 0.5 + 0.05 if opts.pop("alibi", False) else None
    window = _window(opts.pop("causal", False), opts.pop("window_size", None))
    softcap = opts.pop("softcap", 0.0)
    scale = 1.0 / math.sqrt(d)
    assert gluon_forward_supported(q, k, v, window_size=window, softcap=softcap, alibi_slopes=slopes,
                                   dropout_p=0.0, softmax_scale=scale, cu_seqlens_q=cu_q)
    _poison(q.numel() * q.element_size())
    out, lse = gluon_forward(q, k, v, scale, window, softcap, slopes, cu_q, cu_k, max(lens_q), max(lens_k),
                             config=config)
    assert out.shape == q.shape and lse.shape == (nheads, q.shape[0])
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(batch):
        sl_q, sl_k = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        qb, kb, vb = q[sl_q].unsqueeze(0), k[sl_k].unsqueeze(0), v[sl_k].unsqueeze(0)
        mods = dict(window_size=window, softcap=softcap, alibi_slopes=None if slopes is None else slopes[b])
        print(f"sequence {b}: seqlen_q {lens_q[b]}, seqlen_k {lens_k[b]}")
        _compare(out[sl_q].unsqueeze(0), lse[:, sl_q].unsqueeze(0), *attention_ref(qb, kb, vb, **mods),
                 *attention_ref(qb, kb, vb, upcast=False, **mods), dtype)


def test_varlen_packed_qkv_strides():
    """Varlen views of a packed (total, 3, h, d) qkv: row stride 3 h d, no copies."""
    lens = [300, 0, 1, 700]
    qkv = torch.randn(sum(lens), 3, 4, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    assert gluon_forward_supported(q, k, v, window_size=(-1, 0), softcap=0.0, alibi_slopes=None,
                                   dropout_p=0.0, cu_seqlens_q=cu)
    out, lse = gluon_forward(q, k, v, 1 / math.sqrt(128), (-1, 0), 0.0, None, cu, cu, max(lens), max(lens))
    cl = cu.tolist()
    for b in range(len(lens)):
        sl = slice(cl[b], cl[b + 1])
        qb, kb, vb = (t[sl].unsqueeze(0) for t in (q, k, v))
        _compare(out[sl].unsqueeze(0), lse[:, sl].unsqueeze(0), *attention_ref(qb, kb, vb, causal=True),
                 *attention_ref(qb, kb, vb, causal=True, upcast=False), torch.bfloat16)


def _count_gluon_forwards(monkeypatch) -> list:
    """A list that gets an entry for each public-API forward from here on that runs the Gluon kernel: through
    ``gluon_forward`` or through a plan an earlier call like it left (``gluon_forward_planned``)."""
    from ioattn.ops import attention

    calls = []
    real, planned = attention.gluon_forward, attention.gluon_forward_planned

    def counted_planned(*a, **kw):
        res = planned(*a, **kw)
        if res is not None:
            calls.append(1)
        return res

    monkeypatch.setattr(attention, "gluon_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(attention, "gluon_forward_planned", counted_planned)
    return calls


@pytest.mark.parametrize("opts", [
    {"causal": True}, {"window_size": (64, 64)}, {"softcap": 30.0}, {"alibi_slopes": True},
], ids=str)
def test_public_api_routes_here(opts, monkeypatch):
    """flash_attn_func and flash_attn_varlen_func take this kernel for every feature, dropout included."""
    import ioattn

    opts = dict(opts)
    if opts.get("alibi_slopes"):
        opts["alibi_slopes"] = torch.rand(8, device="cuda") * 0.2
    q, k, v = _qkv(2, 1000, 1000, 8, 2, 128, torch.bfloat16)
    calls = _count_gluon_forwards(monkeypatch)
    cu = torch.tensor([0, 1000, 2000], dtype=torch.int32, device="cuda")
    outs = [ioattn.flash_attn_func(q, k, v, **opts),
            ioattn.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 1000, 1000,
                                          **opts).view_as(q)]
    assert len(calls) == 2
    ref_out, _ = attention_ref(q, k, v, **opts)
    base_out, _ = attention_ref(q, k, v, upcast=False, **opts)
    for out in outs:
        r = tolerance_check(out, ref_out, base_out, factor=OUT_FACTOR, floor=FLOOR[q.dtype])
        print(r)
        assert r.ok, str(r)
    ioattn.flash_attn_func(q, k, v, dropout_p=0.1, **opts)
    assert len(calls) == 3


def test_predicate(monkeypatch):
    q, k, v = _qkv(1, 64, 64, 2, 2, 128, torch.bfloat16)
    kw = dict(window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0)
    assert gluon_forward_supported(q, k, v, **kw)
    assert gluon_forward_supported(q, k, v, **{**kw, "window_size": (8, 8)})
    assert gluon_forward_supported(q, k, v, **{**kw, "softcap": 5.0})
    assert gluon_forward_supported(q, k, v, **{**kw, "alibi_slopes": torch.rand(2, device="cuda")})
    assert gluon_forward_supported(q, k, v, **{**kw, "dropout_p": 0.1})
    assert not gluon_forward_supported(q, k, v, **{**kw, "dropout_p": 1.0})
    assert not gluon_forward_supported(q.float(), k.float(), v.float(), **kw)
    assert not gluon_forward_supported(q[..., :96], k[..., :96], v[..., :96], **kw)
    assert gluon_forward_supported(q[..., :64], k[..., :64], v[..., :64], **kw) == (64 in _ROUTED_HEAD_DIMS)
    assert not gluon_forward_supported(q, k, v, **kw, softmax_scale=-0.1)
    assert gluon_forward_supported(q, k, v, **{**kw, "softcap": 5.0}, softmax_scale=-0.1)
    cu = torch.tensor([0, 64], dtype=torch.int32, device="cuda")
    assert not gluon_forward_supported(q, k, v, **kw, cu_seqlens_q=cu)  # varlen inputs are 3-D
    assert gluon_forward_supported(q[0], k[0], v[0], **kw, cu_seqlens_q=cu)
    odd = torch.randn(2, 64, 2, 129, device="cuda", dtype=torch.bfloat16)[..., :128]
    assert not gluon_forward_supported(odd, odd, odd, **kw)  # row stride 258 elements: not 16-byte aligned
    # a 2D view of one row (batch 1, seqlen 1): ptxas crashed on the forward Triton specialises for it
    assert not gluon_forward_supported(q[:, :1], k, v, **kw)
    assert not gluon_forward_supported(q, k[:, :1], v[:, :1], **kw)
    one = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    assert not gluon_forward_supported(q[0, :1], k[0], v[0], **kw, cu_seqlens_q=one)  # varlen, one row in all
    monkeypatch.setenv("IOATTN_GLUON", "0")
    assert not gluon_forward_supported(q, k, v, **kw)


@pytest.mark.parametrize("hq,hk,lq,lk", [(32, 8, 1, 1024), (4, 4, 1, 1), (4, 2, 2, 1), (128, 32, 1, 256)])
def test_one_row_calls(hq, hk, lq, lk):
    """Calls whose q (or k) is a single row, one sequence: a one-sequence decoding step through flash_attn_func
    (its Gluon build crashed ptxas; the portable kernels take them), forward and backward against the
    reference (``test_flash_attn.check_against_ref``)."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, lq, lk, hq, hk, 128, torch.bfloat16))
    check_against_ref(q, k, v)


def _check_dropout(q, k, v, p, seed, window=(-1, -1), cu=None, lens=None, config=None, **mods):
    """gluon_forward with dropout against attention_ref with ioattn.dropout's mask for the same seed: the
    output drops exactly those elements (scaled by 1 / (1 - p)), the lse is that of the undropped scores."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    nheads = q.shape[-2]
    _poison(q.numel() * q.element_size())
    if cu is None:
        out, lse = gluon_forward(q, k, v, scale, window, dropout_p=p, seed=seed, config=config, **mods)
        mask = dropout_keep_mask(seed, q.shape[0], nheads, q.shape[1], k.shape[1], p, "cuda")
        pieces = [(out, lse, q, k, v, mask)]
    else:
        (cu_q, cu_k), (lens_q, lens_k) = cu, lens
        out, lse = gluon_forward(q, k, v, scale, window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                 max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), dropout_p=p, seed=seed,
                                 config=config, **mods)
        cq, ck = cu_q.tolist(), cu_k.tolist()
        pieces = []
        for b in range(len(lens_q)):
            sl_q, sl_k = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            mask = dropout_keep_mask(seed, len(lens_q), nheads, max(lens_q), max(lens_k), p, "cuda",
                                     batch_index=b, q_len=lens_q[b], k_len=lens_k[b])
            pieces.append((out[sl_q].unsqueeze(0), lse[:, sl_q].unsqueeze(0), q[sl_q].unsqueeze(0),
                           k[sl_k].unsqueeze(0), v[sl_k].unsqueeze(0), mask))
    for o, l, qb, kb, vb, mask in pieces:
        ref = dict(window_size=window, dropout_p=p, dropout_mask=mask, **mods)
        _compare(o, l, *attention_ref(qb, kb, vb, **ref), *attention_ref(qb, kb, vb, upcast=False, **ref),
                 q.dtype)
    return out


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("opts", [{}, {"window": (-1, 0)}, {"window": (100, 30)}, {"softcap": 20.0},
                                  {"alibi": True, "window": (-1, 0)}], ids=str)
@pytest.mark.parametrize("seqlens", [(1, 70), (200, 200), (1025, 777)])
def test_dropout(seqlens, opts, d):
    torch.manual_seed(11)
    opts = dict(opts)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(4, device="cuda") * 0.3
    q, k, v = _qkv(2, *seqlens, 4, 2, d, torch.bfloat16)
    _check_dropout(q, k, v, 0.3, 2**40 + 77, **opts)


@pytest.mark.parametrize("p", [0.0001, 0.5, 0.9])
def test_dropout_probabilities_and_seeds(p):
    """Kept fraction near 1 - p through the kernel; another seed drops other elements; the same seed repeats
    bit for bit."""
    q, k, v = _qkv(1, 512, 512, 2, 2, 128, torch.float16)
    a = _check_dropout(q, k, v, p, 5)
    b = _check_dropout(q, k, v, p, 1)
    assert not torch.equal(a, b)
    assert torch.equal(a, gluon_forward(q, k, v, 1 / math.sqrt(128), dropout_p=p, seed=5)[0])
    kept = dropout_keep_mask(5, 1, 2, 512, 512, p, "cuda").float().mean().item()
    assert abs(kept - (1 - p)) < 0.01


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_varlen(d, causal):
    torch.manual_seed(12)
    lens_q, lens_k = [300, 1, 0, 700, 129], [300, 64, 5, 650, 1000]
    q = torch.randn(sum(lens_q), 4, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens_k), 1, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(lens_k), 1, d, device="cuda", dtype=torch.bfloat16)
    cu = tuple(torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
               for lens in (lens_q, lens_k))
    _check_dropout(q, k, v, 0.2, 314159, (-1, 0) if causal else (-1, -1), cu, (lens_q, lens_k))


@pytest.mark.parametrize("opts", [{"causal": True}, {"window_size": (70, 20)}, {}], ids=str)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_dropout_public_api_forward_and_backward(d, opts, monkeypatch):
    """flash_attn_func with dropout: the Gluon forward and the backward (Gluon at every d here) regenerate one mask;
    output, lse and gradients against attention_ref with that mask (test_flash_attn's rule)."""

    from ioattn.dropout import draw_seed

    calls = _count_gluon_forwards(monkeypatch)
    torch.manual_seed(13)
    b, sq, sk, h, p = 2, 600, 650, 4, 0.25
    q, k, v = (t.requires_grad_() for t in _qkv(b, sq, sk, h, 2, d, torch.bfloat16))
    torch.manual_seed(99)
    mask = dropout_keep_mask(draw_seed("cuda"), b, h, sq, sk, p, "cuda")
    check_against_ref(q, k, v, dropout_p=p, dropout_mask=mask, seed=99, **opts)
    assert calls == [1]


# The max held at softcap's bound (with the row sums on the tensor cores) on both loops of the consumers, and
# d = 256's shipped config (64-key blocks: the row sums' ones tile is 64 keys); d = 64's one-warpgroup kernel
# on both of its loops.
FIXED_MAX_CONFIGS = [(128, FwdConfig(64, 128, 2, 4, "pingpong", True, True, True, fixed_max=True)),
                     (128, FwdConfig(64, 128, 2, 4, "pingpong", fixed_max=True)), (256, _CONFIGS[256]),
                     (64, FwdConfig(64, 128, 2, 4, fixed_max=True)),
                     (64, FwdConfig(64, 128, 2, 4, "single", True, fixed_max=True))]


def _d_config_id(dc):
    d, cfg = dc
    return f"d{d}-{_ws_id(cfg)}-{cfg.block_n}keys"


@pytest.mark.parametrize("d_config", FIXED_MAX_CONFIGS, ids=_d_config_id)
@pytest.mark.parametrize("softcap", [2.0, 40.0, 50.0])
@pytest.mark.parametrize("scores", ["random", "far-below-bound", "one-key"])
def test_softcap_fixed_max(scores, softcap, d_config):
    """bf16 with softcap <= 40 holds the softmax's max at tanh's bound (no row max, no rescaling); 50, fp16,
    ALiBi and dropout keep the online max. "far-below-bound": every score of every row near -softcap (tanh
    near -1), so p sits near 2^-115 at 40 and the output is a weighted mean of V; "one-key": rows with a
    single allowed key must give that key's value (P as rounded for PV is what the rows sum). Causal and a
    window with sq < sk, so rows differ in length."""
    d, config = d_config
    bf16 = torch.bfloat16
    assert _softcap_mode(softcap, bf16, False, 0.0, config) == (2 if softcap <= 40 else 1)
    assert _softcap_mode(softcap, torch.float16, False, 0.0, config) == 1
    assert _softcap_mode(softcap, bf16, True, 0.0, config) == 1
    assert _softcap_mode(softcap, bf16, False, 0.1, config) == 1
    assert _softcap_mode(softcap, bf16, False, 0.0, config._replace(fixed_max=False)) == 1
    torch.manual_seed(int(softcap))
    q, k, v = _qkv(2, 300, 777, 4, 2, d, bf16)
    if scores == "far-below-bound":
        q, k = -q.abs() * 3, k.abs() + 1
    if scores == "one-key":
        _check(q, k, v, softcap=softcap, window_size=(0, 0), config=config)
        return
    _check(q, k, v, softcap=softcap, causal=True, config=config)
    _check(q, k, v, softcap=softcap, window_size=(100, 40), config=config)


# ALiBi split by sides (HAS_ALIBI 2, FwdConfig.alibi_sides): key blocks wholly left or right of a tile's rows
# take one FMA per score and a row term, blocks across the diagonal the exact |i - j| form, on both loops of
# the consumers; d = 256's shipped config splits 64-key blocks.
ALIBI_SIDES_CONFIGS = [(128, FwdConfig(64, 128, 2, 4, "pingpong", True, True, True, alibi_sides=True)),
                       (128, FwdConfig(64, 128, 2, 4, "pingpong", alibi_sides=True)), (256, _CONFIGS[256])]


@pytest.mark.parametrize("d_config", ALIBI_SIDES_CONFIGS, ids=_d_config_id)
@pytest.mark.parametrize("case", [
    {"seqlens": (2048, 2048)}, {"seqlens": (300, 3000)}, {"seqlens": (3000, 300)}, {"seqlens": (1000, 1000)},
    {"seqlens": (2048, 2048), "causal": True}, {"seqlens": (777, 1500), "window_size": (200, 50)},
    {"seqlens": (1500, 777), "window_size": (-1, 300)}, {"seqlens": (129, 129), "causal": True},
], ids=str)
@pytest.mark.parametrize("slopes", ["alibi", "strong", "weak"])
def test_alibi_sides(case, slopes, d_config):
    """Against the reference, and the exact form everywhere (HAS_ALIBI 1) within rounding: "alibi" the
    paper's geometric slopes (2^-1 ... 2^-4 for four heads, per batch scaled), "strong" slopes near 1 (a row
    sees a few keys), "weak" 2^-10 (the bias spans the whole sequence)."""
    d, config = d_config
    case = dict(case)
    torch.manual_seed(sum(case["seqlens"]) + len(slopes))
    batch, nheads = 2, 4
    q, k, v = _qkv(batch, *case.pop("seqlens"), nheads, 2, d, torch.bfloat16)
    base = {"alibi": 2.0 ** -torch.arange(1, nheads + 1, device="cuda"),
            "strong": torch.rand(nheads, device="cuda") * 0.2 + 0.8,
            "weak": torch.full((nheads,), 2.0 ** -10, device="cuda")}[slopes]
    alibi = (base[None, :] * torch.tensor([[1.0], [0.5]], device="cuda")).contiguous()
    out, lse = _check(q, k, v, config=config, alibi_slopes=alibi, **case)
    window = _window(case.get("causal", False), case.get("window_size"))
    exact, exact_lse = gluon_forward(q, k, v, 1.0 / math.sqrt(d), window, 0.0, alibi,
                                     config=config._replace(alibi_sides=False))
    assert (out.float() - exact.float()).abs().max().item() < 2e-2
    finite = torch.isfinite(exact_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - exact_lse[finite]).abs().max().item() < 1e-3


class _LaunchSpy:
    """Stands in for a kernel's launcher: records each launch's (CHAIN, PAIRED) flags, then launches."""

    def __init__(self, launcher, seen):
        self.launcher, self.seen = launcher, seen

    def __call__(self, grid, *args, **kwargs):
        self.seen.append((kwargs.get("CHAIN"), kwargs.get("PAIRED", False)))
        return self.launcher(grid, *args, **kwargs)


def _spy_launches(monkeypatch, sms=3):
    """The (CHAIN, PAIRED) flags of each warp-specialised forward launched from here on, on a device that
    pretends to have ``sms`` SMs (so each persistent program walks many tiles)."""
    from ioattn.kernels import attn_fwd_gluon

    monkeypatch.setattr(attn_fwd_gluon, "_num_sms", lambda device: sms)
    launched = []
    for name in ("_launch_ws", "_launch_sched"):
        monkeypatch.setattr(attn_fwd_gluon, name, _LaunchSpy(getattr(attn_fwd_gluon, name), launched))
    return launched


def _expected_route(config, seqlen_q, seqlen_k, window):
    """(CHAIN, PAIRED) as gluon_forward routes a dense input: the paired schedule with a right window and no
    left one, every query block seeing a key and 8 query tiles or more; chained on a persistent schedule that
    is not the dynamic one."""
    left, right = window
    paired = (config.paired and config.chain and right >= 0 and left < 0 and seqlen_q <= seqlen_k
              and -(-seqlen_q // (2 * config.block_m)) >= 8)
    dynamic = config.dynamic and right >= 0 and not paired
    persistent = dynamic or paired or (config.persistent and right < 0)
    return config.chain and persistent and not dynamic, paired


@pytest.mark.parametrize("config", CHAIN_CONFIGS + [_CONFIGS[128]], ids=_ws_id)
@pytest.mark.parametrize("case", [
    {"seqlens": (2048, 2048)}, {"seqlens": (1000, 1000)}, {"seqlens": (1500, 100)}, {"seqlens": (700, 2000)},
    {"seqlens": (1100, 600), "window_size": (130, -1)}, {"seqlens": (900, 1300), "window_size": (0, -1)},
    {"seqlens": (640, 640), "batch": 1}, {"seqlens": (1000, 1000), "causal": True},
    {"seqlens": (1100, 600), "causal": True}, {"seqlens": (1000, 1300), "softcap": 30.0},
    {"seqlens": (1200, 1200), "softcap": 60.0}, {"seqlens": (800, 1000), "alibi": True},
    {"seqlens": (800, 1000), "alibi": True, "window_size": (300, -1)},
    {"seqlens": (1000, 1000), "dropout": 0.2}, {"seqlens": (777, 900), "dropout": 0.1, "window_size": (50, -1)},
    # Whole 64-row query tiles (the bulk store applies): ALiBi, a left window.
    {"seqlens": (1024, 1024), "alibi": True}, {"seqlens": (1024, 1536), "window_size": (200, -1)},
], ids=str)
def test_chain(case, config, monkeypatch):
    """Chained tiles over many tiles a program: the device pretends to have 3 SMs, so each program runs
    its tiles back to back (the last PV of one with the first QK^T of the next, both Q slots in turn).
    One key block a tile (sk = 100) or many, partial query tiles, left windows, softcap (held max where bf16
    allows), ALiBi by sides, dropout, the bulk store (shipped config); with a right window (causal, sq > sk
    with tiles without keys) the same configs run the dynamic schedule unchained, as the host routes them,
    or, with ``paired`` (the shipped config), causal inputs whose queries all see a key the paired one."""
    launched = _spy_launches(monkeypatch)
    expected = _expected_route(config, *case["seqlens"], _window(case.get("causal", False), case.get("window_size")))
    case = dict(case)
    torch.manual_seed(sum(case["seqlens"]) + 7)
    batch, nheads = case.pop("batch", 2), 4
    q, k, v = _qkv(batch, *case.pop("seqlens"), nheads, 2, 128, torch.bfloat16)
    if case.pop("alibi", False):
        case["alibi_slopes"] = torch.rand(batch, nheads, device="cuda") * 0.3 + 0.01
    p = case.pop("dropout", 0.0)
    if p:
        window = _window(case.pop("causal", False), case.pop("window_size", None))
        _check_dropout(q, k, v, p, 2**33 + 5, window, config=config, **case)
    else:
        _check(q, k, v, config=config, **case)
    assert launched == [expected]


@pytest.mark.parametrize("config", PAIRED_CONFIGS + [_CONFIGS[128]], ids=_ws_id)
@pytest.mark.parametrize("case", [
    # num_m = cdiv(sq, 128) even and odd (the middle block alone), sq < sk, GQA / MQA, one batch.
    {"seqlens": (2048, 2048)}, {"seqlens": (1100, 1100)}, {"seqlens": (1300, 1300), "nheads_k": 1},
    {"seqlens": (1000, 2000)}, {"seqlens": (1200, 1200), "batch": 1},
    {"seqlens": (1000, 1300), "window_size": (-1, 100)}, {"seqlens": (1024, 1024), "window_size": (-1, 0)},
    {"seqlens": (1000, 1000), "softcap": 30.0}, {"seqlens": (1000, 1200), "softcap": 60.0},
    {"seqlens": (1024, 1024), "alibi": True}, {"seqlens": (900, 1000), "dropout": 0.2},
    # Not paired: queries past the keys (blocks with no key), a left window too (a band), fewer than 8
    # query tiles.
    {"seqlens": (1100, 600)}, {"seqlens": (1000, 1000), "window_size": (200, 0)}, {"seqlens": (200, 200)},
    {"seqlens": (640, 640), "batch": 1}, {"seqlens": (700, 2000)}, {"seqlens": (896, 896)},
], ids=str)
@pytest.mark.parametrize("sms", [3, 4096])
def test_paired(case, config, sms, monkeypatch):
    """Causal-shaped inputs on the chained static schedule over pairs of query blocks (the long block
    num_m - 1 - j with the short block j of one head), many pairs a program (3 SMs) or one each (more SMs
    than pairs: no program without a pair, whose consumers would wait for a Q tile forever): every block
    computed once, both Q slots in turn across the pairs, the odd middle block alone; the routes it must
    not take."""
    launched = _spy_launches(monkeypatch, sms)
    case = dict(case)
    window = _window(True, None) if "window_size" not in case else case["window_size"]
    expected = _expected_route(config, *case["seqlens"], window)
    sq, sk = case["seqlens"]
    assert config.paired and expected[1] == (window[0] < 0 and sq <= sk and sq > 7 * 128)
    torch.manual_seed(sum(case["seqlens"]) + 11)
    batch, nheads = case.pop("batch", 2), 4
    q, k, v = _qkv(batch, *case.pop("seqlens"), nheads, case.pop("nheads_k", 2), 128, torch.bfloat16)
    if case.pop("alibi", False):
        case["alibi_slopes"] = torch.rand(batch, nheads, device="cuda") * 0.3 + 0.01
    case["window_size"] = window
    p = case.pop("dropout", 0.0)
    if p:
        _check_dropout(q, k, v, p, 2**33 + 9, case.pop("window_size"), config=config, **case)
    else:
        _check(q, k, v, config=config, **case)
    assert launched == [expected]


# Bands, causal diagonals and ragged ends: at d = 64 on the one-warpgroup kernel's 64-row tiles, whose band
# blocks start at a multiple of 64; at d = 128 on the unchained tiles (the dynamic schedule, varlen), with
# 128-row tiles over 128-key blocks: a (512, 512) band leaves the second half of a tile's last block to its
# second consumer's rows only and the first half of its first block to its first consumer's; a (448, 448)
# band leaves a half of the first and of the last block with no allowed key for one consumer; a causal
# diagonal (sq <= sk under 8 query tiles, or sq > sk) halves the first consumer's last block; ragged ends
# of 1-64 keys past a block boundary.
BAND_CASES = [
    {"seqlens": (2048, 2048), "window_size": (512, 512)}, {"seqlens": (1024, 1024), "window_size": (448, 448)},
    {"seqlens": (1000, 1100), "window_size": (200, 70)}, {"seqlens": (700, 700), "causal": True},
    {"seqlens": (2000, 300), "causal": True}, {"seqlens": (600, 1030), "window_size": (-1, 3)},
    {"seqlens": (1024, 1024), "window_size": (64, 64)}, {"seqlens": (1030, 1030), "window_size": (1, 0)},
    {"seqlens": (900, 900), "window_size": (300, 300), "alibi": True},
    {"seqlens": (900, 900), "window_size": (300, 300), "alibi": True, "softcap": 20.0},
    {"seqlens": (800, 800), "window_size": (250, 250), "softcap": 50.0},
    {"seqlens": (900, 900), "window_size": (300, 300), "dropout": 0.15},
]


@pytest.mark.parametrize("case", BAND_CASES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_band_edges(case, d):
    """The shipped configs on band edges (halves of the first and last key block that none of a consumer's
    rows allows), causal diagonals and ragged ends, against the reference; with ALiBi, online softcap (> 40
    or with ALiBi) and dropout. At d = 64 (64-row tiles) a band's key blocks start at a multiple of 64 and its
    last block is then often a half block."""
    case = dict(case)
    torch.manual_seed(sum(case["seqlens"]) + 13)
    batch, nheads = 2, 4
    q, k, v = _qkv(batch, *case.pop("seqlens"), nheads, 2, d, torch.bfloat16)
    if case.pop("alibi", False):
        case["alibi_slopes"] = torch.rand(batch, nheads, device="cuda") * 0.3 + 0.01
    p = case.pop("dropout", 0.0)
    if p:
        window = _window(case.pop("causal", False), case.pop("window_size", None))
        _check_dropout(q, k, v, p, 2**33 + 13, window, **case)
    else:
        _check(q, k, v, **case)


@pytest.mark.parametrize("lens", [([1030, 190, 64, 129, 1], [1030, 190, 64, 129, 1]),
                                  ([700, 300, 65], [1100, 1000, 65])], ids=str)
@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"window_size": (448, 448)}], ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_band_edges_varlen(lens, opts, d):
    """Varlen tiles (the shipped configs) whose sequences end 1-64 keys past a key block, under a causal mask
    and a (448, 448) band (at d = 64 its blocks start at a multiple of 64 from each sequence's start)."""
    test_varlen(lens, opts, d, None)


# Plans: a dense forward records one (``gluon_forward``); the next call like it launches through it
# (``gluon_forward_planned``, which the op's forward tries first). Shapes of every launch kind: the
# one-warpgroup kernel (d = 64), the persistent chained one with the bulk store (d = 128), paired and dynamic
# causal, a band, held-max softcap, d = 256; dropout, whose seed is a tensor the kernel reads (values 1, a
# multiple of 16, neither, past 32 bits), the second call's another one.
PLAN_CASES = [
    (64, 1000, {}), (128, 1024, {}), (128, 1000, {}), (128, 1024, {"causal": True}), (128, 600, {"causal": True}),
    (128, 900, {"window": (100, 50)}), (128, 1000, {"softcap": 30.0}), (256, 700, {"causal": True}),
    (128, 800, {"p": 0.2, "seeds": (1, 1)}), (128, 800, {"p": 0.2, "seeds": (32, 4096)}),
    (128, 800, {"p": 0.2, "seeds": (17, 12345)}), (64, 800, {"p": 0.1, "seeds": (2**40 + 3, 2**41 + 7)}),
]


def _plan_key(q, k, v, scale, window=(-1, -1), softcap=0.0, p=0.0):
    from ioattn.kernels import attn_fwd_gluon

    return attn_fwd_gluon.forward_plan_key(q, k, v, scale, window, softcap, p)


@pytest.mark.parametrize("d, seqlen, opts", PLAN_CASES, ids=str)
def test_plan_matches_the_whole_path(d, seqlen, opts):
    """No key for a shape's first call; the second records a plan; the next call like those launches through
    it, on new tensors, and gives what ``gluon_forward`` gives for those tensors bit for bit (with dropout,
    for each seed tensor it is given); another shape, or a seed tensor Triton would see unaligned, finds no
    plan."""
    from ioattn.kernels import attn_fwd_gluon

    window = opts.get("window", (-1, 0) if opts.get("causal") else (-1, -1))
    softcap, p = opts.get("softcap", 0.0), opts.get("p", 0.0)
    seeds = tuple(torch.tensor([s], dtype=torch.int64, device="cuda") if p else None
                  for s in opts.get("seeds", (0, 0)))
    scale = d ** -0.5
    torch.manual_seed(seqlen + d)
    first = _qkv(2, seqlen, seqlen, 4, 2, d, torch.bfloat16)
    for sighting in range(2):  # as the op calls: the key (none for a shape's first call), the plan, the whole path
        key = _plan_key(*first, scale, window, softcap, p)
        assert (key is None) == (sighting == 0)
        assert attn_fwd_gluon.gluon_forward_planned(key, *first, p, seeds[0]) is None
        attn_fwd_gluon.gluon_forward(*first, scale, window, softcap, dropout_p=p, seed=seeds[0], plan_key=key)
        assert len(attn_fwd_gluon._FWD_PLANS) == sighting
    q, k, v = _qkv(2, seqlen, seqlen, 4, 2, d, torch.bfloat16)
    key = _plan_key(q, k, v, scale, window, softcap, p)
    res = attn_fwd_gluon.gluon_forward_planned(key, q, k, v, p, seeds[1])
    assert res is not None
    ref_out, ref_lse = attn_fwd_gluon.gluon_forward(q, k, v, scale, window, softcap, dropout_p=p, seed=seeds[1])
    assert torch.equal(res[0], ref_out) and torch.equal(res[1], ref_lse)
    if not p:
        _compare(*res, *attention_ref(q, k, v, window_size=window, softcap=softcap),
                 *attention_ref(q, k, v, window_size=window, softcap=softcap, upcast=False), q.dtype)
    else:
        again = attn_fwd_gluon.gluon_forward_planned(key, q, k, v, p, seeds[0])  # the plan reads each call's seed
        ref_again = attn_fwd_gluon.gluon_forward(q, k, v, scale, window, softcap, dropout_p=p, seed=seeds[0])
        assert torch.equal(again[0], ref_again[0])
        assert torch.equal(again[0], res[0]) == torch.equal(seeds[0], seeds[1])
        odd = torch.empty(3, dtype=torch.int64, device="cuda")[1:2]  # 8-byte aligned: not as specialised
        odd.copy_(seeds[1])
        assert attn_fwd_gluon.gluon_forward_planned(key, q, k, v, p, odd) is None
    longer = _qkv(2, seqlen + 1, seqlen + 1, 4, 2, d, torch.bfloat16)
    assert _plan_key(*longer, scale, window, softcap, p) is None  # a new shape: no key
    key = _plan_key(*longer, scale, window, softcap, p)
    assert key is not None and attn_fwd_gluon.gluon_forward_planned(key, *longer, p, seeds[1]) is None


def test_public_api_takes_the_plan(monkeypatch):
    """flash_attn_func's third call like its first two goes through the plan the second recorded (the op's
    forward tries it before the support check), and its result is right."""
    import ioattn
    from ioattn.ops import attention

    calls, planned_runs = [], []
    real, planned = attention.gluon_forward, attention.gluon_forward_planned
    monkeypatch.setattr(attention, "gluon_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(attention, "gluon_forward_planned",
                        lambda *a, **kw: planned_runs.append(planned(*a, **kw)) or planned_runs[-1])
    for _ in range(2):
        q, k, v = _qkv(2, 1000, 1000, 8, 2, 128, torch.bfloat16)
        ioattn.flash_attn_func(q, k, v, causal=True)
    assert calls == [1, 1] and planned_runs == [None, None]
    q, k, v = _qkv(2, 1000, 1000, 8, 2, 128, torch.bfloat16)
    out, lse, _ = ioattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert calls == [1, 1] and len(planned_runs) == 3 and planned_runs[2] is not None
    _compare(out, lse, *attention_ref(q, k, v, causal=True), *attention_ref(q, k, v, causal=True, upcast=False),
             q.dtype)


def test_plan_not_recorded_for_shapes_seen_once(monkeypatch):
    """Shapes that change every call make no key and record no plan, and each call is still right."""
    import ioattn
    from ioattn.kernels import attn_fwd_gluon, fastlaunch

    entries = []
    monkeypatch.setattr(fastlaunch.Launcher, "entry", lambda *a, **kw: entries.append(1) or None)
    for s in (700, 701, 702):
        q, k, v = _qkv(1, s, s, 4, 4, 128, torch.bfloat16)
        out, lse, _ = ioattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        _compare(out, lse, *attention_ref(q, k, v, causal=True), *attention_ref(q, k, v, causal=True, upcast=False),
                 q.dtype)
    assert entries == [] and len(attn_fwd_gluon._FWD_PLANS) == 0


@pytest.mark.parametrize("seqlen", [600, 2048], ids=["dynamic", "paired"])
def test_planned_forward_on_a_side_stream_and_in_a_graph(seqlen, monkeypatch):
    """With a plan recorded, the public API's forward on a side stream (launched there, while the default
    stream sleeps; the dynamic schedule's counter is that stream's) and captured in a CUDA graph (a zeroed
    counter of its own; replayed on new inputs) goes through the plan and gives what ``gluon_forward`` gives,
    bit for bit."""
    import ioattn
    from ioattn.kernels import attn_fwd_gluon
    from ioattn.ops import attention

    torch.manual_seed(seqlen)
    q, k, v = _qkv(2, seqlen, seqlen, 8, 2, 128, torch.bfloat16)
    ref_out, ref_lse = attn_fwd_gluon.gluon_forward(q, k, v, 128 ** -0.5, (-1, 0))
    for _ in range(2):
        ioattn.flash_attn_func(q, k, v, causal=True)
    assert len(attn_fwd_gluon._FWD_PLANS) == 1
    whole = []
    real = attention.gluon_forward
    monkeypatch.setattr(attention, "gluon_forward", lambda *a, **kw: whole.append(1) or real(*a, **kw))
    ref_host = (ref_out.cpu(), ref_lse.cpu())
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # the default stream busy for tens of ms: work queued behind it is late
    with torch.cuda.stream(side):
        out, lse, _ = ioattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        host = (out.cpu(), lse.cpu())  # waits for the side stream only
    assert not torch.cuda.current_stream().query(), "the sleep ended first: the stream check proves nothing"
    torch.cuda.synchronize()
    assert torch.equal(host[0], ref_host[0]) and torch.equal(host[1], ref_host[1])
    static = [t.clone() for t in (q, k, v)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse, _ = ioattn.flash_attn_func(*static, causal=True, return_attn_probs=True)
    assert whole == []
    new = _qkv(2, seqlen, seqlen, 8, 2, 128, torch.bfloat16)
    for dst, src in zip(static, new, strict=True):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    new_out, new_lse = attn_fwd_gluon.gluon_forward(*new, 128 ** -0.5, (-1, 0))
    assert torch.equal(g_out, new_out) and torch.equal(g_lse, new_lse)


def test_plan_declines_what_it_cannot_take(monkeypatch):
    """With a plan recorded: a misaligned q (same shape and strides, data 2 bytes off) finds none and the
    op sends it to the portable kernel; ``IOATTN_GLUON=0`` makes no key; a config patched in (as the A/B
    scripts do) or another SM count (as tests pretend) makes another key; the fast launch off declines it;
    plans off make no key."""
    from ioattn.kernels import attn_fwd_gluon, fastlaunch
    from ioattn.ops import attention

    planned = attn_fwd_gluon.gluon_forward_planned
    scale = 128 ** -0.5
    q, k, v = _qkv(1, 512, 512, 4, 4, 128, torch.bfloat16)
    for _ in range(2):
        attn_fwd_gluon.gluon_forward(q, k, v, scale, plan_key=_plan_key(q, k, v, scale))
    key = _plan_key(q, k, v, scale)
    assert planned(key, q, k, v, 0.0, None) is not None
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    q_off = buf[1:].view(q.shape).copy_(q)
    assert q_off.data_ptr() % 16 and q_off.stride() == q.stride()
    assert _plan_key(q_off, k, v, scale) == key and planned(key, q_off, k, v, 0.0, None) is None
    out, lse = attention._flash_attn_fwd(q_off, k, v, None, None, 512, 512, scale, -1, -1, 0.0, None, 0.0, None)
    _compare(out, lse, *attention_ref(q, k, v), *attention_ref(q, k, v, upcast=False), q.dtype)
    monkeypatch.setenv("IOATTN_GLUON", "0")
    assert _plan_key(q, k, v, scale) is None  # no key: the op takes its whole path, which routes off Gluon
    monkeypatch.delenv("IOATTN_GLUON")
    assert planned(key, q, k, v, 0.0, None) is not None
    assert planned(key, q, k, v, 1.0, 0) is None  # every element dropped: not the plan's kernel
    shipped = attn_fwd_gluon._CONFIGS[128]
    monkeypatch.setitem(attn_fwd_gluon._CONFIGS, 128, shipped._replace(chain=False))
    assert _plan_key(q, k, v, scale) != key
    monkeypatch.setitem(attn_fwd_gluon._CONFIGS, 128, shipped)
    monkeypatch.setattr(attn_fwd_gluon, "_num_sms", lambda device: 7)
    assert _plan_key(q, k, v, scale) != key
    monkeypatch.undo()
    monkeypatch.setattr(fastlaunch, "_ENABLED", False)  # IOATTN_FAST_LAUNCH=0: no direct launch to replay
    assert _plan_key(q, k, v, scale) is None and planned(key, q, k, v, 0.0, None) is None
    monkeypatch.undo()
    assert planned(key, q, k, v, 0.0, None) is not None
    monkeypatch.setattr(attn_fwd_gluon._FWD_PLANS, "enabled", False)
    assert _plan_key(q, k, v, scale) is None
