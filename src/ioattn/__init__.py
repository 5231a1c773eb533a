"""ioattn: IO-aware exact attention in pure Python (PyTorch + Triton)."""

from .chunked import memory_efficient_attention
from .interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .kvcache import flash_attn_with_kvcache, write_kv
from .reference import attention_ref
from .sdpa import scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = [
    "attention_ref",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "memory_efficient_attention",
    "scaled_dot_product_attention",
    "write_kv",
]
