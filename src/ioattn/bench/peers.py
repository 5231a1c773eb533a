"""The implementations a benchmark compares, each a small object with one calling convention.

Every peer takes q, k, v in ioattn's layout (batch, seqlen, nheads, headdim) and returns the output in
that layout; peers whose native layout is (batch, nheads, seqlen, headdim) (SDPA, FlexAttention) get
transposed views, as the FlashAttention-2 paper's own benchmarks do. A peer says whether it can run here
(``available``) and whether one problem size is sensible for it (``fits``); the suite skips it with the
reason otherwise.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .timing import free_memory_bytes

MODES_TIMED = ("fwd", "fwdbwd")
PEER_NAMES = ("ioattn", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex", "flash-attn",
              "xformers", "chunked")

Verdict = tuple[bool, str]
_OK: Verdict = (True, "")


class Peer:
    """One attention implementation. Subclasses set ``name`` and implement ``forward``."""

    name: str = ""
    needs_cuda: bool = True
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    max_headdim: int | None = None

    def available(self, device: torch.device, dtype: torch.dtype, headdim: int) -> Verdict:
        """Whether this peer can run at all on ``device`` with ``dtype`` and ``headdim``, and why not."""
        if self.needs_cuda and device.type != "cuda":
            return False, f"needs a CUDA device, not {device.type}"
        if dtype not in self.dtypes:
            return False, f"does not support {dtype}"
        if self.max_headdim is not None and headdim > self.max_headdim:
            return False, f"supports head dims up to {self.max_headdim}, not {headdim}"
        return _OK

    def fits(self, batch: int, seqlen: int, nheads: int, headdim: int, dtype: torch.dtype,
             device: torch.device, backward: bool) -> Verdict:
        """Whether this problem size is sensible for the peer (memory, speed), and why not."""
        return _OK

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        raise NotImplementedError

    def make_fn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str,
                dout: torch.Tensor | None = None) -> Callable[[], object]:
        """A zero-argument function running one ``mode`` ("fwd" or "fwdbwd") on these inputs.

        The forward runs with autograd recording when the inputs require grad, so that "fwd" is exactly
        the forward half of "fwdbwd" and bwd = time(fwdbwd) - time(fwd) is the backward alone.
        """
        if mode == "fwd":
            return lambda: self.forward(q, k, v, causal)
        if mode == "fwdbwd":
            if dout is None:
                raise ValueError("make_fn(mode='fwdbwd') needs dout, the output gradient")

            def fwdbwd() -> None:
                self.forward(q, k, v, causal).backward(dout)

            return fwdbwd
        raise ValueError(f"mode must be one of {MODES_TIMED}, got {mode!r}")


def _bhsd(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.transpose(1, 2) for x in xs]


class IoattnPeer(Peer):
    """ioattn's Triton kernels through the public ``ioattn.flash_attn_func``."""

    name = "ioattn"
    max_headdim = 256

    def available(self, device: torch.device, dtype: torch.dtype, headdim: int) -> Verdict:
        ok, why = super().available(device, dtype, headdim)
        if not ok:
            return ok, why
        from ..backend import select_backend

        if select_backend(device) != "triton":
            return False, "IOATTN_BACKEND selects the chunked path, not the Triton kernels"
        if importlib.util.find_spec("ioattn.ops.attention") is None:
            return False, "the Triton kernels (ioattn.ops.attention) are not built yet"
        return _OK

    def forward(self, q, k, v, causal):
        from ..interface import flash_attn_func

        return flash_attn_func(q, k, v, causal=causal)


class SdpaPeer(Peer):
    """``torch.nn.functional.scaled_dot_product_attention`` with one backend forced."""

    def __init__(self, name: str, backend_name: str, needs_cuda: bool = True):
        self.name = name
        self.backend_name = backend_name
        self.needs_cuda = needs_cuda

    def forward(self, q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, self.backend_name)):
            out = F.scaled_dot_product_attention(*_bhsd(q, k, v), is_causal=causal)
        return out.transpose(1, 2)


class SdpaMathPeer(SdpaPeer):
    """SDPA's math backend materialises the scores (float32 for half inputs), so it gets a memory guard."""

    # Live (batch, nheads, seqlen, seqlen) float32 buffers at the peak: scores, probabilities and the
    # upcast copies in the forward; their gradients on top in the backward.
    SCORE_BUFFERS_FWD = 3
    SCORE_BUFFERS_FWDBWD = 6
    MEMORY_FRACTION = 0.8

    def __init__(self):
        super().__init__("sdpa-math", "MATH", needs_cuda=False)

    def fits(self, batch, seqlen, nheads, headdim, dtype, device, backward):
        buffers = self.SCORE_BUFFERS_FWDBWD if backward else self.SCORE_BUFFERS_FWD
        need = buffers * batch * nheads * seqlen * seqlen * 4
        free = free_memory_bytes(device)
        if need > self.MEMORY_FRACTION * free:
            return False, (f"would need about {need / 2**30:.1f} GiB for the scores, "
                           f"{free / 2**30:.1f} GiB free")
        return _OK


class FlexPeer(Peer):
    """FlexAttention compiled by ``torch.compile`` (Triton kernels), with a block mask when causal."""

    name = "flex"
    _RECOMPILE_LIMIT = 1024

    def __init__(self):
        self._compiled: Callable | None = None
        self._mask_key: tuple | None = None
        self._mask = None

    def available(self, device, dtype, headdim):
        ok, why = super().available(device, dtype, headdim)
        if not ok:
            return ok, why
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return False, f"torch {torch.__version__} has no FlexAttention"
        return _OK

    def _flex(self) -> Callable:
        if self._compiled is None:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention

            # Every (seqlen, causal, headdim) is a new graph; past the default limit dynamo would fall
            # back to eager FlexAttention, which materialises the scores and is not what we measure.
            for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, self._RECOMPILE_LIMIT)
            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def _block_mask(self, seqlen: int, device: torch.device):
        key = (seqlen, str(device))
        if self._mask_key != key:
            from torch.nn.attention.flex_attention import create_block_mask

            def causal_mask(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx

            self._mask = create_block_mask(causal_mask, None, None, seqlen, seqlen, device=device)
            self._mask_key = key
        return self._mask

    def forward(self, q, k, v, causal):
        block_mask = self._block_mask(q.shape[1], q.device) if causal else None
        return self._flex()(*_bhsd(q, k, v), block_mask=block_mask).transpose(1, 2)

    def make_fn(self, q, k, v, causal, mode, dout=None):
        if causal:
            self._block_mask(q.shape[1], q.device)  # built once per configuration, outside the timing
        return super().make_fn(q, k, v, causal, mode, dout)


class FlashAttnPeer(Peer):
    """Tri Dao's flash-attn package (FlashAttention-2 CUDA kernels), when installed."""

    name = "flash-attn"
    dtypes = (torch.float16, torch.bfloat16)
    max_headdim = 256

    def available(self, device, dtype, headdim):
        if importlib.util.find_spec("flash_attn") is None:
            return False, "flash-attn is not installed"
        return super().available(device, dtype, headdim)

    def forward(self, q, k, v, causal):
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, causal=causal)


class XformersPeer(Peer):
    """xformers' ``memory_efficient_attention`` (its own dispatcher picks the kernel), when installed."""

    name = "xformers"

    def available(self, device, dtype, headdim):
        if importlib.util.find_spec("xformers") is None:
            return False, "xformers is not installed"
        return super().available(device, dtype, headdim)

    def forward(self, q, k, v, causal):
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)


class ChunkedPeer(Peer):
    """ioattn's chunked pure-PyTorch path (Rabe & Staats); only sensible at moderate lengths."""

    name = "chunked"
    needs_cuda = False
    max_seqlen = 4096

    def fits(self, batch, seqlen, nheads, headdim, dtype, device, backward):
        if seqlen > self.max_seqlen:
            return False, f"run only up to seqlen {self.max_seqlen} (a reference point, not a contender)"
        return _OK

    def forward(self, q, k, v, causal):
        from ..chunked import memory_efficient_attention

        return memory_efficient_attention(q, k, v, causal=causal)


def all_peers() -> dict[str, Peer]:
    """A fresh instance of every peer, in the order they run within a configuration."""
    peers: list[Peer] = [
        IoattnPeer(),
        SdpaPeer("sdpa-flash", "FLASH_ATTENTION"),
        SdpaPeer("sdpa-cudnn", "CUDNN_ATTENTION"),
        SdpaPeer("sdpa-efficient", "EFFICIENT_ATTENTION"),
        SdpaMathPeer(),
        FlexPeer(),
        FlashAttnPeer(),
        XformersPeer(),
        ChunkedPeer(),
    ]
    assert tuple(p.name for p in peers) == PEER_NAMES
    return {p.name: p for p in peers}
