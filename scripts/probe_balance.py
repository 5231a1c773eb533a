"""Load balance of the Gluon kernels across SMs, for `ncu`: one call of each case between
cudaProfilerStart/Stop, so that

    PYTHONPATH=src:scripts ncu --profile-from-start off -k regex:gluon --metrics gpu__time_duration.sum,\
sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_active.min --csv python scripts/probe_balance.py CASES

reports per kernel the time and the SMs' active cycles: avg / max is the share of the kernel's span the SMs
were busy on average (1.0: balanced to the last cycle). CASES: 'pass:d:feature:seqlen,...' (pass fwd or bwd,
features as ``ioattn bench features``: bf16, 16k tokens, hidden 2048).
"""

import sys

import torch
from ab_gluon import timed_call

from ioattn.bench.features import make_case

if len(sys.argv) != 2:
    sys.exit(__doc__)
cases = sys.argv[1].split(",")
for case in cases:
    direction, d, feature, s = case.split(":")
    call, leaves, _ = make_case(feature, int(s), int(d), torch.device("cuda"), torch.bfloat16)
    fn = timed_call(direction, call, leaves)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"case {case} done", flush=True)
