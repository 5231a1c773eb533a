"""Helpers shared by the tests and ``ioattn check``: random inputs and the tolerance rule.

The rule (flash-attn's own): our max abs error against the float64 reference may be at most
``factor`` times PyTorch's max abs error doing the same math in the same low precision, plus ``floor``.
``factor`` is 2 for outputs and 3 for gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dropout import dropout_keep_mask

OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


@dataclass(frozen=True)
class ToleranceResult:
    """Outcome of :func:`tolerance_check`; ``str()`` gives the line tests print before asserting."""

    name: str
    our_error: float
    base_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.our_error <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{self.name}: ours {self.our_error:.3e}  pytorch-same-dtype {self.base_error:.3e}  "
                f"bound {self.bound:.3e}  {verdict}")


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |x - ref| in float64; positions where both are -inf (empty rows' lse) count as equal.
    NaN anywhere in ``x`` gives inf, so an unwritten (NaN-poisoned) element always fails."""
    x, ref = x.detach().double(), ref.detach().double()
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.numel() == 0:
        return 0.0
    if torch.isnan(x).any():
        return float("inf")
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    diff = torch.where(both_inf, 0.0, (x - ref).abs())
    return float(diff.max())


def tolerance_check(
    out: torch.Tensor,
    ref_out: torch.Tensor,
    base_out: torch.Tensor,
    *,
    factor: float = OUT_FACTOR,
    floor: float = 1e-5,
    name: str = "out",
) -> ToleranceResult:
    """Applies the tolerance rule to one tensor.

    Arguments:
        out: our result, any shape.
        ref_out: the float64 (upcast) reference, same shape.
        base_out: PyTorch doing the same math in the inputs' dtype, same shape.
        factor: 2 for outputs, 3 for gradients.
        floor: absolute slack for results PyTorch gets (nearly) exact.
    """
    our = max_abs_error(out, ref_out)
    base = max_abs_error(base_out, ref_out)
    return ToleranceResult(name, our, base, factor * base + floor)


def make_qkv(
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    nheads: int,
    nheads_k: int,
    headdim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    requires_grad: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard-normal q (batch, seqlen_q, nheads, headdim), k and v (batch, seqlen_k, nheads_k, headdim)."""
    shapes = ((batch, seqlen_q, nheads, headdim), (batch, seqlen_k, nheads_k, headdim),
              (batch, seqlen_k, nheads_k, headdim))
    return tuple(
        torch.randn(s, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        .requires_grad_(requires_grad)
        for s in shapes
    )


def make_cu_seqlens(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 (len(lengths) + 1,) cumulative sequence lengths starting at 0."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def make_alibi(batch: int, nheads: int, per_batch: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positive float32 slopes, (batch, nheads) when ``per_batch`` else (nheads,)."""
    shape = (batch, nheads) if per_batch else (nheads,)
    return (torch.rand(shape, dtype=torch.float32) * 0.5 + 0.05).to(device)


def dropout_mask_for_call(
    seed: int, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The whole (batch, nheads, seqlen_q, seqlen_k) keep mask a dense call with ``seed`` uses, for
    ``attention_ref(..., dropout_mask=...)``."""
    return dropout_keep_mask(seed, batch, nheads, seqlen_q, seqlen_k, dropout_p, device)


def varlen_dropout_masks(
    seed: int, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, nheads: int,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
) -> list[torch.Tensor]:
    """Per sequence b, the (1, nheads, len_q_b, len_k_b) keep mask of the varlen grid."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    batch = len(cq) - 1
    return [
        dropout_keep_mask(seed, batch, nheads, max_seqlen_q, max_seqlen_k, dropout_p, cu_seqlens_q.device,
                          batch_index=b, q_len=cq[b + 1] - cq[b], k_len=ck[b + 1] - ck[b])
        for b in range(batch)
    ]
