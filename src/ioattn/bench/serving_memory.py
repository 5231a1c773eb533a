"""PagedAttention's memory experiment (Kwon et al., arXiv 2309.06180, Fig. 2 and Fig. 15), replayed through the
real :class:`ioattn.paged.BlockManager` (metadata only: the same allocator and tables, no K/V tensors).

    python -m ioattn.bench.serving_memory [--requests 1500] [--seed 0] [--block-size 16] [--kv-gb 12]
                                          [--json PATH] [--plot PATH]

Model (every assumption, stated):

* Model and budget: OPT-13B, whose K and V take 2 x 40 layers x 5120 x 2 bytes = 800 KiB per token, on an
  A100-40GB where ~30% of memory (12 GB, the paper's Fig. 1) holds the KV cache: 12e9 / 819200 = 14,648
  token slots (915 blocks of 16). Maximum sequence length 2048 (OPT).
* Traces: prompt and output lengths are lognormal, with the means of the paper's Fig. 11 (ShareGPT: input
  161.31 / output 337.99 tokens; Alpaca: 19.31 / 58.45) and spreads we chose to look like those
  histograms (log-sd: ShareGPT 1.0 / 0.8, Alpaca 0.5 / 1.0), rounded, at least 1 token, and cut so that
  prompt + output <= 2048. Seeded; the achieved means are reported. Token ids are uniform over a 50,272
  vocabulary (OPT), so distinct requests share no prefix by accident; prefix caching is off (as in the
  paper's vLLM), sharing comes only from fork.
* Serving: every request is waiting at time 0 (a saturated server); each step admits waiting requests first
  come, first served while their prompt fits (paged: a 1% free-block watermark, as vLLM), then every running
  sequence generates one token. A request holds its memory until its last output token. When an append
  finds no free block, the most recently admitted request is preempted (freed and restarted later, as
  vLLM's recomputation, from its first token); a request that does not fit even alone is dropped and
  counted. Statistics are averaged over the steps while requests are still waiting (steady
  state under full load; the final drain is left out).
* Policies. contiguous-max: a request reserves max-length (2048) slots per sequence (Orca (Max));
  contiguous-oracle: it reserves exactly prompt + output (Orca (Oracle)); neither is charged external
  fragmentation, which favours them. paged: one sequence per request. parallel-n: n samples fork the prompt
  and each generates the request's output length. beam-k: k beams fork the prompt; at each step each of the
  k new beams picks its parent uniformly among the k current beams (a Wright-Fisher genealogy: beams share
  the prompt and every generated prefix they have in common, and diverge by copy-on-write of the last
  block); parents without children are freed.
* Metrics. utilisation = tokens stored / slots reserved (physical: a shared block counts once); waste = 1 -
  utilisation; token share = tokens stored / the whole KV budget (the paper's Fig. 2 measure); requests in
  flight = running requests per step; sharing saving = 1 - physical blocks / logical blocks, the logical
  blocks being what the sequences would hold without sharing (the paper's Fig. 15 measure).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ioattn.paged import BlockManager, OutOfBlocksError

from .report import run_metadata

KV_BYTES_PER_TOKEN = 2 * 40 * 5120 * 2  # OPT-13B: K and V, 40 layers, hidden 5120, fp16
MAX_SEQ_LEN = 2048
VOCAB = 50272
WATERMARK = 0.01


@dataclass(frozen=True)
class TraceSpec:
    """Lognormal length model: published means, chosen log-sds."""

    name: str
    mean_input: float
    mean_output: float
    sigma_input: float
    sigma_output: float


TRACES = {
    "sharegpt": TraceSpec("sharegpt", 161.31, 337.99, 1.0, 0.8),
    "alpaca": TraceSpec("alpaca", 19.31, 58.45, 0.5, 1.0),
}

POLICIES = ("contiguous-max", "contiguous-oracle", "paged", "parallel-2", "parallel-4", "parallel-6",
            "beam-2", "beam-4", "beam-6")

# The paper's numbers, for the comparison (Fig. 2: share of KV memory holding tokens; Fig. 15: Alpaca).
PAPER = {
    "token_share": {"contiguous (Orca)": (0.204, 0.382), "paged (vLLM)": (0.963, 0.963)},
    "parallel_saving_alpaca": (0.061, 0.098),
    "beam_saving_alpaca": (0.376, 0.552),
    "paged_waste_max": 0.04,
}


def make_trace(spec: TraceSpec, num_requests: int, seed: int) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs: lognormal with ``spec``'s means, cut to MAX_SEQ_LEN in total."""
    rng = np.random.default_rng(seed)
    lengths = []
    for mean, sigma in ((spec.mean_input, spec.sigma_input), (spec.mean_output, spec.sigma_output)):
        mu = math.log(mean) - sigma**2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
        lengths.append(np.maximum(1, np.rint(rng.lognormal(mu, sigma, num_requests))).astype(int))
    prompts = np.minimum(lengths[0], MAX_SEQ_LEN - 1)
    outputs = np.minimum(lengths[1], MAX_SEQ_LEN - prompts)
    return [(int(p), int(o)) for p, o in zip(prompts, outputs, strict=True)]


@dataclass
class _Request:
    index: int
    prompt_len: int
    output_len: int
    seqs: list[int]
    generated: int = 0


def _policy_kind(policy: str) -> tuple[str, int]:
    kind, _, width = policy.partition("-")
    if kind == "contiguous":
        return policy, 1
    return kind, int(width) if width else 1


def simulate(trace: Sequence[tuple[int, int]], policy: str, block_size: int, budget_tokens: int,
             seed: int) -> dict[str, float]:
    """Run one policy over one trace; returns the averaged statistics (see the module docstring)."""
    kind, width = _policy_kind(policy)
    rng = random.Random(seed)
    num_blocks = budget_tokens // block_size
    mgr = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    watermark = math.ceil(WATERMARK * num_blocks)
    waiting = [_Request(i, p, o, []) for i, (p, o) in enumerate(trace)]
    waiting.reverse()  # pop() from the end = first come, first served
    running: list[_Request] = []
    reserved_contig = 0
    next_seq = 0
    sums = {"stored": 0.0, "reserved": 0.0, "running": 0.0, "seqs": 0.0, "physical": 0.0, "logical": 0.0}
    steps = preemptions = dropped = 0

    def reservation(r: _Request) -> int:
        return (MAX_SEQ_LEN if kind == "contiguous-max" else r.prompt_len + r.output_len) * width

    def release(r: _Request) -> None:
        nonlocal reserved_contig
        if kind.startswith("contiguous"):
            reserved_contig -= reservation(r)
        for s in r.seqs:
            mgr.free(s)
        r.seqs = []

    while waiting or running:
        # Admission, first come first served; stop at the first request that does not fit.
        while waiting:
            r = waiting[-1]
            if kind.startswith("contiguous"):
                fits = reserved_contig + reservation(r) <= budget_tokens
            else:
                fits = mgr.num_free_blocks - -(-r.prompt_len // block_size) >= watermark
            if not fits:
                if running:
                    break
                waiting.pop()  # does not fit in an empty pool: it never will
                dropped += 1
                continue
            if kind.startswith("contiguous"):
                reserved_contig += reservation(r)
            else:
                mgr.allocate(next_seq, [rng.randrange(VOCAB) for _ in range(r.prompt_len)])
                r.seqs = [next_seq]
                for _ in range(width - 1):
                    mgr.fork(r.seqs[0], next_seq + len(r.seqs))
                    r.seqs.append(next_seq + len(r.seqs))
                next_seq += width
            running.append(waiting.pop())
        saturated = bool(waiting)
        # One decoding step for every running request, in admission order.
        i = 0
        while i < len(running):
            r = running[i]
            if not kind.startswith("contiguous"):
                if kind == "beam":
                    parents = [rng.randrange(width) for _ in range(width)]
                    children = [parents.count(p) for p in range(width)]
                    beams = []
                    for p, c in enumerate(children):
                        for _ in range(c - 1):
                            mgr.fork(r.seqs[p], next_seq)
                            beams.append(next_seq)
                            next_seq += 1
                        if c:
                            beams.append(r.seqs[p])
                        else:
                            mgr.free(r.seqs[p])
                    r.seqs = beams
                tokens = [rng.randrange(VOCAB) for _ in r.seqs]
                while True:
                    try:
                        mgr.append_slots(r.seqs, tokens)
                        break
                    except OutOfBlocksError:
                        victim = running.pop()  # the most recently admitted
                        release(victim)
                        victim.generated = 0
                        if victim is r and not running:
                            dropped += 1  # alone, it still does not fit: it never can
                            break
                        waiting.append(victim)
                        preemptions += 1
                        if victim is r:
                            break
                if r not in running:
                    continue
                mgr.flush_copies()
            r.generated += 1
            i += 1
        if saturated:
            steps += 1
            if kind.startswith("contiguous"):
                sums["stored"] += sum((r.prompt_len + r.generated) * width for r in running)
                sums["reserved"] += reserved_contig
            else:
                st = mgr.stats()
                sums["stored"] += st.stored_tokens
                sums["reserved"] += st.allocated_slots
                sums["physical"] += st.used_blocks
                sums["logical"] += st.logical_blocks
            sums["running"] += len(running)
            sums["seqs"] += sum(len(r.seqs) or width for r in running)
        for r in [r for r in running if r.generated >= r.output_len]:
            running.remove(r)
            release(r)
    assert mgr.num_free_blocks == num_blocks and reserved_contig == 0, "the simulation leaked memory"
    steps = max(steps, 1)
    util = sums["stored"] / sums["reserved"] if sums["reserved"] else 1.0
    return {
        "utilisation": util,
        "waste": 1.0 - util,
        "token_share": sums["stored"] / steps / budget_tokens,
        "requests_in_flight": sums["running"] / steps,
        "sequences_in_flight": sums["seqs"] / steps,
        "sharing_saving": 1.0 - sums["physical"] / sums["logical"] if sums["logical"] else 0.0,
        "preemptions": preemptions,
        "dropped": dropped,
        "steady_steps": steps,
    }


def run_experiment(num_requests: int, seed: int, block_size: int, kv_gb: float,
                   policies: Sequence[str] = POLICIES, traces: Sequence[str] = tuple(TRACES)) -> dict:
    """Every policy on every trace; returns the JSON document (settings, trace statistics, rows)."""
    budget_tokens = int(kv_gb * 1e9) // KV_BYTES_PER_TOKEN
    budget_tokens -= budget_tokens % block_size
    rows, trace_stats = [], {}
    for t, name in enumerate(traces):
        trace = make_trace(TRACES[name], num_requests, seed + t)
        trace_stats[name] = {
            "mean_input": float(np.mean([p for p, _ in trace])),
            "mean_output": float(np.mean([o for _, o in trace])),
            "max_total": int(max(p + o for p, o in trace)),
            **{k: v for k, v in asdict(TRACES[name]).items() if k != "name"},
        }
        for policy in policies:
            stats = simulate(trace, policy, block_size, budget_tokens, seed)
            rows.append({"trace": name, "policy": policy, **stats})
    return {
        "experiment": "serving-memory",
        "settings": {
            "requests": num_requests, "seed": seed, "block_size": block_size, "kv_gb": kv_gb,
            "kv_bytes_per_token": KV_BYTES_PER_TOKEN, "budget_tokens": budget_tokens,
            "budget_blocks": budget_tokens // block_size, "max_seq_len": MAX_SEQ_LEN,
            "watermark": WATERMARK,
        },
        "traces": trace_stats,
        "paper": PAPER,
        "rows": rows,
    }


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of the rows."""
    lines = [
        "| trace | policy | utilisation | waste | token share of budget | requests in flight "
        "| sequences in flight | saved by sharing | preemptions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        saving = f"{100 * r['sharing_saving']:.1f}%" if r["policy"][0] in "pb" else "–"
        lines.append(
            f"| {r['trace']} | {r['policy']} | {100 * r['utilisation']:.1f}% | {100 * r['waste']:.1f}% "
            f"| {100 * r['token_share']:.1f}% | {r['requests_in_flight']:.1f} | {r['sequences_in_flight']:.1f} "
            f"| {saving} | {r['preemptions']} |"
        )
    return "\n".join(lines)


def plot(doc: dict, path: str | Path) -> Path:
    """Three panels: utilisation per policy, requests in flight, memory saved by sharing (with the paper's
    Alpaca ranges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    traces = list(doc["traces"])
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["trace"], r["policy"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    width = 0.8 / len(traces)
    x = np.arange(len(policies))
    for i, t in enumerate(traces):
        util = [100 * by[t, p]["utilisation"] for p in policies]
        flight = [by[t, p]["requests_in_flight"] for p in policies]
        axes[0].bar(x + i * width, util, width, label=t)
        axes[1].bar(x + i * width, flight, width, label=t)
    axes[0].axhline(96, color="k", ls=":", lw=1, label="paper: paged waste < 4%")
    for ax, label in ((axes[0], "KV utilisation (tokens / reserved), %"), (axes[1], "requests in flight")):
        ax.set_xticks(x + width * (len(traces) - 1) / 2, policies, rotation=40, ha="right")
        ax.set_ylabel(label)
        ax.legend()
    axes[1].set_yscale("log")
    shared = [p for p in policies if p[0] in "pb"]
    xs = np.arange(len(shared))
    for i, t in enumerate(traces):
        axes[2].bar(xs + i * width, [100 * by[t, p]["sharing_saving"] for p in shared], width, label=t)
    for lo_hi, group in ((PAPER["parallel_saving_alpaca"], "parallel"), (PAPER["beam_saving_alpaca"], "beam")):
        idx = [j for j, p in enumerate(shared) if p.startswith(group)]
        if idx:
            axes[2].fill_between([min(idx) - 0.4, max(idx) + 0.8], 100 * lo_hi[0], 100 * lo_hi[1],
                                 color="grey", alpha=0.25, lw=0)
    axes[2].set_xticks(xs + width * (len(traces) - 1) / 2, shared, rotation=40, ha="right")
    axes[2].set_ylabel("KV memory saved by sharing, % (grey: paper, Alpaca)")
    axes[2].legend()
    s = doc["settings"]
    fig.suptitle(f"PagedAttention KV memory, {s['requests']} requests per trace, block {s['block_size']}, "
                 f"{s['budget_blocks']} blocks = {s['kv_gb']:g} GB at {s['kv_bytes_per_token'] // 1024} KiB/token")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ioattn.bench.serving_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1500, help="requests per trace")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-gb", type=float, default=12.0, help="KV-cache budget in GB (1e9 bytes)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--traces", default=",".join(TRACES))
    parser.add_argument("--json", default=None, help="write the document here ('-' for stdout only)")
    parser.add_argument("--plot", default=None, help="write the PNG here")
    args = parser.parse_args(argv)
    doc = run_experiment(args.requests, args.seed, args.block_size, args.kv_gb,
                         args.policies.split(","), args.traces.split(","))
    doc.update(run_metadata(torch.device("cpu")))  # device, date, commit, torch and triton versions
    print(format_table(doc["rows"]))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    if args.plot:
        print(f"wrote {plot(doc, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
