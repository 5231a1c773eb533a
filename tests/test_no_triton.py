"""Without Triton installed (it is a dependency only on Linux x86-64), the chunked path serves every public
function on any device: dense and varlen attention, the KV-cache call with appended tokens over contiguous and
paged caches, ``write_kv`` and paged varlen queries. Run in a subprocess whose ``import triton`` fails."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # every import of triton (and of its submodules) fails
    import torch
    import ioattn
    from ioattn.backend import select_backend
    assert select_backend(torch.device("cuda")) == "chunked"  # reads only the device type
    from ioattn.reference import attention_ref as reference

    def attention_ref(*args, **kwargs):
        return reference(*args, **kwargs)[0]

    def close(a, b):
        assert (a.float() - b.float()).abs().max().item() < 1e-4, (a - b).abs().max().item()

    torch.manual_seed(0)
    b, h, hk, d, cap = 2, 4, 2, 32, 24
    q = torch.randn(b, 3, h, d)
    k, v = torch.randn(b, 19, hk, d), torch.randn(b, 19, hk, d)
    close(ioattn.flash_attn_func(q, k, v, causal=True), attention_ref(q, k, v, causal=True))
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    out = ioattn.flash_attn_varlen_func(q.reshape(6, h, d), k[:, :3].reshape(6, hk, d),
                                        v[:, :3].reshape(6, hk, d), cu, cu, 3, 3, causal=True)
    close(out.reshape(b, 3, h, d), attention_ref(q, k[:, :3], v[:, :3], causal=True))

    # appended tokens into a contiguous cache, then the same into a paged one (pages of 4, shuffled)
    k_cache, v_cache = torch.randn(b, cap, hk, d), torch.randn(b, cap, hk, d)
    lens = torch.tensor([5, 11], dtype=torch.int32)
    k_new, v_new = torch.randn(b, 3, hk, d), torch.randn(b, 3, hk, d)
    kp, vp = k_cache.clone(), v_cache.clone()
    out = ioattn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True)
    for i in range(b):
        n = int(lens[i]) + 3
        assert torch.equal(k_cache[i, n - 3:n], k_new[i]) and torch.equal(v_cache[i, n - 3:n], v_new[i])
        close(out[i:i + 1], attention_ref(q[i:i + 1], k_cache[i:i + 1, :n], v_cache[i:i + 1, :n], causal=True))
    perm = torch.randperm(b * cap // 4)
    table = perm.reshape(b, cap // 4).to(torch.int32)
    pages_k = torch.empty(b * cap // 4, 4, hk, d)
    pages_v = torch.empty_like(pages_k)
    pages_k[perm] = kp.reshape(b * cap // 4, 4, hk, d)
    pages_v[perm] = vp.reshape(b * cap // 4, 4, hk, d)
    out_p = ioattn.flash_attn_with_kvcache(q, pages_k, pages_v, k_new, v_new, cache_seqlens=lens,
                                           block_table=table, causal=True)
    close(out_p, out)

    # write_kv by slot mapping, then packed queries over the pages
    slots = table[:, 0].long() * 4 + 3  # the last slot of each sequence's first page
    kw, vw = torch.randn(b, hk, d), torch.randn(b, hk, d)
    ioattn.write_kv(kw, vw, pages_k, pages_v, slots)
    assert torch.equal(pages_k.reshape(-1, hk, d)[slots], kw)
    seqlens_k = lens + 3
    cu_k = torch.tensor([0, int(seqlens_k[0]), int(seqlens_k.sum())], dtype=torch.int32)
    out_v = ioattn.flash_attn_varlen_func(q.reshape(6, h, d), pages_k, pages_v, cu, cu_k, 3, int(seqlens_k.max()),
                                          causal=True, block_table=table)
    for i in range(b):
        n = int(seqlens_k[i])
        keys = pages_k[table[i].long()].reshape(cap, hk, d)[:n][None]
        vals = pages_v[table[i].long()].reshape(cap, hk, d)[:n][None]
        close(out_v[3 * i:3 * i + 3][None], attention_ref(q[i:i + 1], keys, vals, causal=True))
    print("ok")
""")


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_every_function_runs_without_triton(interpret):
    """TRITON_INTERPRET=1 asks for the kernels on CPU tensors; without Triton the chunked path answers."""
    env = {k: val for k, val in os.environ.items() if k != "IOATTN_BACKEND"}
    env["TRITON_INTERPRET"] = interpret
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
