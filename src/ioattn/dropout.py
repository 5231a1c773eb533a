"""Dropout randomness shared by every backend.

The keep mask is a pure function of ``(seed, b, h, i, j)`` on a (batch, nheads, seqlen_q, seqlen_k) grid.
Keys are taken in groups of 32 (``j = 32 g + 8 c + 2 q + e``, with ``c``, ``q`` in 0..3 and ``e`` in 0..1),
and one Philox-4x32-7 call (Triton's ``tl.randint4x`` with seven rounds, FlashAttention-2's choice of rounds)
serves the eight keys of a group that share ``q``:
its output word ``c`` holds two 16-bit uniforms, the low half for ``e = 0`` and the high half for ``e = 1``.
The call's int64 counter is ``row * 4 * cdiv(seqlen_k, 32) + 4 g + q`` with
``row = (b * nheads + h) * seqlen_q + i``. Element ``(b, h, i, j)`` is kept when its 16-bit value ``u``
satisfies ``u >= ceil(p * 65536)``, ``p`` being ``dropout_p`` rounded to float32: ``u / 65536 >= p``,
a keep probability within 2^-16 of ``1 - p``. Kept elements are scaled by ``1 / (1 - p)``.

Eight keys per call (a quarter of a call per key with 32-bit uniforms, a whole one with ``tl.rand``) and
this particular grouping: a thread of a Hopper wgmma accumulator holds exactly those eight keys of a row
(two neighbouring keys in each of four 8-key column chunks), so the Gluon forward draws them without moving
data between threads. For varlen batches ``seqlen_q``/``seqlen_k`` are ``max_seqlen_q``/``max_seqlen_k`` and
``i``, ``j`` are positions inside each sequence. Because the mask is a function and not a stored tensor, the
backward regenerates exactly the forward's mask, and the chunked path and the Triton kernels drop the same
elements for the same seed.

A call's seed is drawn on the inputs' device, from that device's default generator, into a one-element
int64 tensor that the kernels read (``call_seed``): ``torch.manual_seed`` makes runs repeatable, the host
never reads the seed (no synchronisation), and inside a CUDA graph the draw is captured like any of
PyTorch's random ops, so every replay draws a fresh seed and drops a fresh mask (``torch.cuda.graph`` and
``torch.compile(mode="reduce-overhead")``). ``torch.utils.checkpoint`` restores that generator for its
recomputation, which so drops the same elements.
"""

from __future__ import annotations

import math

import torch

#: Keys per counter group, Philox calls per group (one per ``q``); Philox rounds.
GROUP_KEYS, CALLS_PER_GROUP = 32, 4
PHILOX_ROUNDS = 7


def _draw(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """One seed in [0, 2**62) as a (1,) int64 tensor on ``device``, from its default generator or
    ``generator`` (one of that device)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)


def draw_seed(device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> int:
    """The seed an attention call on ``device`` draws next (``call_seed``), as a Python int: from the
    device's default generator, or from ``generator`` (one of that device). A host read: for tests and tools,
    never for the calls themselves."""
    return int(_draw(device, generator).item())


def rng_state(device: torch.device | str) -> torch.Tensor | None:
    """The state of ``device``'s default generator (what ``torch.get_rng_state`` is for the CPU); None for
    meta tensors, which have no generator."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "meta":
        return None
    return torch.get_device_module(device.type).get_rng_state(device)


def generator_at(state: torch.Tensor, device: torch.device | str) -> torch.Generator:
    """A fresh generator of ``device`` in ``state`` (``rng_state``'s): it draws what the default generator
    drew from that state, without moving the default one."""
    g = torch.Generator(device=device)
    g.set_state(state)
    return g


def call_seed(t: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    """The seed of an attention call on ``t``'s device: None without dropout (no generator moves), else a
    fresh (1,) int64 tensor on that device (``draw_seed`` reads the same value). No host read, so it is
    drawn anew at every replay of a captured CUDA graph."""
    if dropout_p <= 0:
        return None
    return _draw(t.device)


def kernel_seed(seed: int | torch.Tensor | None, dropout_p: float, device: torch.device) -> int | torch.Tensor:
    """What the kernels take as their seed: 0 without dropout (the argument is unused), else a one-element
    int64 tensor on ``device`` that they read (``seed`` itself where it is one, an int copied there)."""
    if dropout_p <= 0:
        return 0
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor([seed], dtype=torch.int64, device=device)


def keep_threshold(dropout_p: float) -> int:
    """The 16-bit threshold: a value ``u`` is kept when ``u >= ceil(float32(dropout_p) * 65536)``
    (the kernels receive ``dropout_p`` as a float32 and compute the same integer)."""
    return math.ceil(float(torch.tensor(dropout_p, dtype=torch.float32)) * 65536)


def counters_per_row(seqlen_k: int) -> int:
    """Philox counters one query row of the grid uses: four per 32 keys."""
    return CALLS_PER_GROUP * ((seqlen_k + GROUP_KEYS - 1) // GROUP_KEYS)


# Philox-4x32 constants, as in triton/language/random.py.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF


def _mul32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * x`` for a uint32 constant ``a`` and uint32 values ``x`` held in int64.

    The 64-bit product would overflow int64, so ``a`` is split into 16-bit halves: every partial product
    stays below 2**49.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t = x * a_lo
    u = x * a_hi + (t >> 16)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32(seed: int | torch.Tensor, offset: torch.Tensor, n_rounds: int = PHILOX_ROUNDS) -> torch.Tensor:
    """The four uint32 outputs of ``tl.randint4x(seed, offset, n_rounds)`` (Triton 3.6), in plain torch,
    bit for bit.

    Arguments:
        seed: int in [0, 2**63), or a one-element int64 tensor on ``offset``'s device holding one (a call's,
            ``call_seed``: no host read); its low / high 32 bits are the Philox key.
        offset: int64 tensor of any shape, values in [0, 2**63); its low / high 32 bits are the first two
            Philox counter words, the other two are 0.
        n_rounds: Philox rounds (the dropout mask's are ``PHILOX_ROUNDS``).
    Returns:
        int64 tensor of shape ``offset.shape + (4,)`` holding the words, each in [0, 2**32).
    """
    c0 = offset & _MASK32
    c1 = offset >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(())
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def dropout_keep_mask(
    seed: int | torch.Tensor,
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
    device: torch.device | str | None = None,
    *,
    batch_index: int | None = None,
    q_start: int = 0,
    k_start: int = 0,
    q_len: int | None = None,
    k_len: int | None = None,
) -> torch.Tensor:
    """The keep mask of the module docstring, or a sub-block of it.

    Arguments:
        seed: the call's seed: an int (:func:`draw_seed`) or the call's seed tensor (:func:`call_seed`).
        batch, nheads, seqlen_q, seqlen_k: the grid (for varlen: number of sequences, nheads,
            max_seqlen_q, max_seqlen_k).
        dropout_p: drop probability in [0, 1).
        device: where the mask is built.
        batch_index: None for all ``batch`` entries, or one batch index.
        q_start, q_len: query rows ``q_start : q_start + q_len`` (q_len None = to ``seqlen_q``).
        k_start, k_len: key columns likewise.
    Returns:
        bool (nb, nheads, q_len, k_len), True = kept; nb = batch, or 1 with ``batch_index``.
    """
    q_len = seqlen_q - q_start if q_len is None else q_len
    k_len = seqlen_k - k_start if k_len is None else k_len
    if batch_index is None:
        b = torch.arange(batch, dtype=torch.int64, device=device)
    else:
        b = torch.tensor([batch_index], dtype=torch.int64, device=device)
    h = torch.arange(nheads, dtype=torch.int64, device=device)
    i = torch.arange(q_start, q_start + q_len, dtype=torch.int64, device=device)
    row = ((b.view(-1, 1) * nheads + h.view(1, -1)) * seqlen_q).view(-1, nheads, 1) + i.view(1, 1, -1)
    # The Philox calls of the key groups that cover the columns (4 per group), each drawn once.
    g_lo = k_start // GROUP_KEYS
    g_hi = (k_start + k_len + GROUP_KEYS - 1) // GROUP_KEYS
    calls = torch.arange(CALLS_PER_GROUP * g_lo, CALLS_PER_GROUP * g_hi, dtype=torch.int64, device=device)
    words = philox4x32(seed, (row * counters_per_row(seqlen_k)).unsqueeze(-1) + calls)  # (..., calls, 4)
    # Key j: call 4 (j // 32) + (j % 8) // 2, word (j % 32) // 8, 16-bit half j % 2.
    j = torch.arange(k_start, k_start + k_len, dtype=torch.int64, device=device)
    call = CALLS_PER_GROUP * (j // GROUP_KEYS - g_lo) + (j % 8) // 2
    u = (words[..., call, (j % GROUP_KEYS) // 8] >> (16 * (j % 2))) & 0xFFFF
    return u >= keep_threshold(dropout_p)
