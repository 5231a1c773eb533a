"""The K/V tensors of a paged KV cache for all layers, in flash-attn 2.x layout, with the batched block copies
that copy-on-write and swapping need.

One tensor ``kv`` of shape (num_layers, 2, num_blocks, block_size, nheads_k, headdim) holds everything, so
``kv[layer, 0]`` (keys) and ``kv[layer, 1]`` (values) are contiguous (num_blocks, block_size, nheads_k,
headdim) caches as ``flash_attn_with_kvcache(block_table=...)`` expects, and a copy of any set of blocks in
every layer is one gather plus one scatter along dimension 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .allocator import check_block_size


def _index(ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long).to(device)


class PagedKVCache:
    """Device pool of ``num_blocks`` blocks (plus an optional host pool of ``num_cpu_blocks`` for swapping).

    Args:
        num_layers, num_blocks, block_size, nheads_k, headdim: sizes; block_size a power of two in [1, 256].
        dtype, device: of the device pool.
        num_cpu_blocks: size of the host pool for swapped-out blocks (pinned when ``device`` is CUDA).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        nheads_k: int,
        headdim: int,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        num_cpu_blocks: int = 0,
    ) -> None:
        check_block_size(block_size)
        for name, val in (("num_layers", num_layers), ("nheads_k", nheads_k), ("headdim", headdim)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        if num_blocks < 0 or num_cpu_blocks < 0:
            raise ValueError(f"num_blocks, num_cpu_blocks must be >= 0, got {num_blocks}, {num_cpu_blocks}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.nheads_k, self.headdim, self.num_cpu_blocks = nheads_k, headdim, num_cpu_blocks
        self.device = torch.device(device)
        shape = (num_layers, 2, num_blocks, block_size, nheads_k, headdim)
        self.kv = torch.zeros(shape, dtype=dtype, device=self.device)
        pin = self.device.type == "cuda"
        self.kv_cpu = torch.zeros(
            (num_layers, 2, num_cpu_blocks, block_size, nheads_k, headdim), dtype=dtype, pin_memory=pin
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    def key_cache(self, layer: int) -> torch.Tensor:
        """Keys of one layer: (num_blocks, block_size, nheads_k, headdim), a view."""
        return self.kv[layer, 0]

    def value_cache(self, layer: int) -> torch.Tensor:
        """Values of one layer: (num_blocks, block_size, nheads_k, headdim), a view."""
        return self.kv[layer, 1]

    def store(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write new tokens' K/V into their slots (a PyTorch scatter; the Triton ``write_kv`` does the same).

        Args:
            slot_mapping: (num_tokens,) int64, slot = block * block_size + offset.
            key, value: (num_tokens, nheads_k, headdim).
        """
        slots = slot_mapping.to(self.device, torch.long)
        flat = (self.num_blocks * self.block_size, self.nheads_k, self.headdim)
        self.kv[layer, 0].view(flat).index_copy_(0, slots, key.to(self.dtype))
        self.kv[layer, 1].view(flat).index_copy_(0, slots, value.to(self.dtype))

    def copy_blocks(self, src: Sequence[int] | torch.Tensor, dst: Sequence[int] | torch.Tensor) -> None:
        """Copy blocks ``src[i] -> dst[i]`` in every layer, K and V, at once (copy-on-write).

        The ``dst`` blocks must be distinct and disjoint from ``src`` (fresh blocks, as copy-on-write gives).
        """
        if len(src) != len(dst):
            raise ValueError(f"src and dst must have the same length, got {len(src)} and {len(dst)}")
        if len(src) == 0:
            return
        src_t, dst_t = _index(src, self.device), _index(dst, self.device)
        self.kv.index_copy_(2, dst_t, self.kv.index_select(2, src_t))

    def swap_out(self, device_blocks: Sequence[int], cpu_blocks: Sequence[int]) -> None:
        """Copy device blocks to host blocks (every layer, K and V), for preemption by swapping."""
        if len(device_blocks) != len(cpu_blocks):
            raise ValueError("device_blocks and cpu_blocks must have the same length")
        if len(device_blocks) == 0:
            return
        staged = self.kv.index_select(2, _index(device_blocks, self.device)).to("cpu")
        self.kv_cpu.index_copy_(2, _index(cpu_blocks, torch.device("cpu")), staged)

    def swap_in(self, cpu_blocks: Sequence[int], device_blocks: Sequence[int]) -> None:
        """Copy host blocks back into device blocks (every layer, K and V)."""
        if len(device_blocks) != len(cpu_blocks):
            raise ValueError("device_blocks and cpu_blocks must have the same length")
        if len(device_blocks) == 0:
            return
        staged = self.kv_cpu.index_select(2, _index(cpu_blocks, torch.device("cpu")))
        if self.device.type == "cuda":
            staged = staged.pin_memory()
        staged = staged.to(self.device, non_blocking=True)
        self.kv.index_copy_(2, _index(device_blocks, self.device), staged)
