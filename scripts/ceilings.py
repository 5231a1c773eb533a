"""The two ceilings of the device: bf16 matrix-product rate and device-to-device copy bandwidth, on random
data, medians of triton.testing.do_bench. Prints one line each and writes JSON to argv[1] if given."""

import json
import sys

import torch
import triton

n = 8192
a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
ms_mm = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
tflops = 2 * n**3 / ms_mm * 1e-9
src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
dst = torch.empty_like(src)
ms_cp = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
tbps = 2 * src.numel() * src.element_size() / ms_cp * 1e-9
result = {"device": torch.cuda.get_device_name(), "bf16_matmul_tflops": round(tflops, 1),
          "copy_tbps_read_plus_write": round(tbps, 2)}
print(f"ceilings on {result['device']}: bf16 {n}^3 matmul {tflops:.0f} TFLOPs/s; "
      f"device copy {tbps:.2f} TB/s (read + write)")
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
