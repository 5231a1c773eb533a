"""Argument checks for the public functions: run once, before any kernel, with errors that name the
argument, the expected and the actual value."""

from __future__ import annotations

import operator

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256

_FP32_MAX = torch.finfo(torch.float32).max


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}.dtype must be one of float16, bfloat16, float32, got {t.dtype}")


def unit_stride(*tensors):
    """The tensors, each whose last dimension is not contiguous replaced by a contiguous copy (flash-attn's
    ``maybe_contiguous`` for q, k, v: autograd passes the copy's gradient back to the original). Anything
    else (not a tensor, rank 0) is returned as given, for the checks to explain."""
    return tuple(t.contiguous() if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[-1] > 1
                 and t.stride(-1) != 1 else t for t in tensors)


# Whether autocast is on for any device type (a C call, about a quarter of ``torch.is_autocast_enabled(type)``'s
# host time); the public call where a torch lacks it.
any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(t) for t in ("cuda", "cpu")))


# What autocast casts to its lower precision (never float64, as autocast's own ops).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (False for types autocast has no notion of, such as
    meta; under torch.compile the tensors are fakes of a real device, and dynamo of torch 2.11 cannot trace the
    availability check)."""
    return (any_autocast() and (torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type))
            and torch.is_autocast_enabled(device_type))


def autocast_qkv(q, k, v):
    """q, k, v in autocast's dtype where ``torch.autocast`` is on for q's device type (float32 / float16 /
    bfloat16 tensors of another dtype are cast, differentiably; float64 is left, as autocast leaves it), as
    SDPA, which autocast runs in its lower precision; as given otherwise, and wherever q, k or v is not a
    tensor (the checks then explain)."""
    if not any_autocast():  # the common case: one C call
        return q, k, v
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or not autocast_on(q.device.type):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)
    return tuple(t.to(dtype) if t.dtype in _AUTOCAST_ELIGIBLE and t.dtype != dtype else t for t in (q, k, v))


def qkv_unit_stride(q, k, v, *, rank: int):
    """(q, k, v, (nheads, nheads_k, headdim)): ``check_qkv`` on q, k, v after ``unit_stride`` (which a call
    whose tensors pass the fast checks does not need, so it costs those nothing), the three first in
    autocast's dtype under ``torch.autocast`` (``autocast_qkv``)."""
    q, k, v = autocast_qkv(q, k, v)
    fast = _qkv_valid(q, k, v, rank)
    if fast is not None:
        return q, k, v, fast
    q, k, v = unit_stride(q, k, v)
    return q, k, v, check_qkv(q, k, v, rank=rank)


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {tuple(t.stride())}")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.dtype != first.dtype:
            raise TypeError(f"{name}.dtype must equal {first_name}.dtype ({first.dtype}), got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} must be on {first_name}'s device ({first.device}), got {t.device}")


# A window side wider than this reaches every key of any sequence of up to 2^28 tokens, and kernels add it to
# positions in 32-bit integers: wider ones are taken as this wide (the same mask), so they cannot overflow.
WINDOW_CAP = 1 << 29


def check_window(window_size: object) -> tuple[int, int]:
    """(left, right) as ints: a negative side is unbounded and comes back as -1 (flash-attn takes any negative
    side so), sides wider than ``WINDOW_CAP`` taken as that."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    left, right = window_size
    if not (type(left) is int and type(right) is int):  # plain ints (every call's case) need no conversion
        left, right = (_window_side(side, val) for side, val in (("left", left), ("right", right)))
    return max(min(left, WINDOW_CAP), -1), max(min(right, WINDOW_CAP), -1)


def _window_side(side: str, val: object) -> int:
    """A window side of any integer type (numpy's too, as flash-attn's int arguments take), as an int."""
    try:
        if isinstance(val, bool):
            raise TypeError
        return operator.index(val)
    except TypeError:
        raise TypeError(f"window_size {side} must be an int, got {type(val).__name__}") from None


def check_scalars(dropout_p: float, softcap: float, softmax_scale: float | None) -> float:
    """Checks the call's scalars; returns the softcap to apply: 0.0 (off) for any softcap <= 0, as flash-attn
    takes it."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    # The kernels take both as fp32: past its largest finite value they would be inf there.
    if not softcap <= _FP32_MAX:  # NaN too
        raise ValueError(f"softcap must be finite (in fp32) or <= 0 (off), got {softcap}")
    if softmax_scale is not None and not 0 < softmax_scale <= _FP32_MAX:
        raise ValueError(f"softmax_scale must be positive and finite (in fp32), or None, got {softmax_scale}")
    return max(float(softcap), 0.0)


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rank: int
) -> tuple[int, int, int]:
    """Checks q, k, v of rank 4 (batch, seqlen, nheads, d) or rank 3 (total, nheads, d) for varlen.
    Returns (nheads, nheads_k, headdim)."""
    fast = _qkv_valid(q, k, v, rank)
    if fast is not None:
        return fast
    names = ("q", "k", "v")
    layout = "(batch, seqlen, nheads, headdim)" if rank == 4 else "(total_tokens, nheads, headdim)"
    for name, t in zip(names, (q, k, v), strict=True):
        _check_tensor(name, t)
        if t.dim() != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")
        check_dtype(name, t)
        check_last_dim_contiguous(name, t)
    check_same(names, (q, k, v))
    if rank == 4:
        if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            raise ValueError(
                f"batch sizes differ: q has {q.shape[0]}, k has {k.shape[0]}, v has {v.shape[0]}"
            )
    if v.shape[-3] != k.shape[-3]:
        raise ValueError(f"v's seqlen must equal k's ({k.shape[-3]}), got {v.shape[-3]}")
    nheads, headdim = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    if v.shape[-2] != nheads_k:
        raise ValueError(f"v's nheads must equal k's nheads_k ({nheads_k}), got {v.shape[-2]}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"q's nheads ({nheads}) must be divisible by k's nheads_k ({nheads_k})")
    if k.shape[-1] != headdim:
        raise ValueError(f"k's headdim must equal q's ({headdim}), got {k.shape[-1]}")
    if v.shape[-1] != headdim:
        raise ValueError(f"v's headdim must equal q's ({headdim}), got {v.shape[-1]}")
    if not 1 <= headdim <= MAX_HEADDIM:
        raise ValueError(f"headdim must be between 1 and {MAX_HEADDIM}, got {headdim}")
    return nheads, nheads_k, headdim


def _qkv_valid(q, k, v, rank: int) -> tuple[int, int, int] | None:
    """``check_qkv``'s answer for arguments that pass every one of its checks, in few operations (it runs
    on every call); None for anything else, which the full checks then explain."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None
    qs, ks, vs = q.shape, k.shape, v.shape
    dtype = q.dtype
    if not (len(qs) == rank and len(ks) == rank and len(vs) == rank and dtype in SUPPORTED_DTYPES
            and k.dtype == dtype and v.dtype == dtype and q.device == k.device and q.device == v.device):
        return None
    nheads, headdim = qs[-2], qs[-1]
    nheads_k = ks[-2]
    if not (vs[-3] == ks[-3] and vs[-2] == nheads_k and nheads_k > 0 and nheads % nheads_k == 0
            and ks[-1] == headdim and vs[-1] == headdim and 1 <= headdim <= MAX_HEADDIM):
        return None
    if rank == 4 and not (ks[0] == qs[0] and vs[0] == qs[0]):
        return None
    if headdim > 1 and not (q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1):
        return None
    return nheads, nheads_k, headdim


def check_alibi(alibi_slopes: object, batch: int, nheads: int, device: torch.device) -> None:
    if alibi_slopes is None:
        return
    t = _check_tensor("alibi_slopes", alibi_slopes)
    if t.dtype != torch.float32:
        raise TypeError(f"alibi_slopes.dtype must be float32, got {t.dtype}")
    if tuple(t.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"alibi_slopes must be on q's device ({device}), got {t.device}")
    check_last_dim_contiguous("alibi_slopes", t)


def host_values_readable(device: torch.device) -> bool:
    """The one policy for value checks of index tensors (cu_seqlens, cache_seqlens, block tables): they
    read the values on the host, so they run only for CPU tensors and never under ``torch.compile``. A
    CUDA tensor is never read back: that would synchronise the device on every call (and break CUDA-graph
    capture), as flash-attn never does either."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def check_cu_seqlens(
    name: str, cu: object, total: int | None, max_seqlen: int, device: torch.device, *, host_check: bool
) -> int:
    """Checks a cu_seqlens tensor and returns the batch size. Value checks (monotone, ends at total unless
    total is None, max_seqlen large enough) read the tensor on the host, so they run only when
    ``host_check`` is set (``host_values_readable``: CPU tensors)."""
    t = _check_tensor(name, cu)
    if t.dtype != torch.int32:
        raise TypeError(f"{name}.dtype must be torch.int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device ({device}), got {t.device}")
    check_last_dim_contiguous(name, t)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen for {name} must be a non-negative int, got {max_seqlen!r}")
    if host_check:
        vals = t.tolist()
        if vals[0] != 0:
            raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
        lens = [b - a for a, b in zip(vals[:-1], vals[1:], strict=True)]
        if min(lens) < 0:
            raise ValueError(f"{name} must be non-decreasing, got {vals}")
        if total is not None and vals[-1] != total:
            raise ValueError(f"{name}[-1] must equal the total number of tokens ({total}), got {vals[-1]}")
        if max(lens) > max_seqlen:
            raise ValueError(f"max_seqlen for {name} must be >= the longest sequence ({max(lens)}), got {max_seqlen}")
    return t.shape[0] - 1
