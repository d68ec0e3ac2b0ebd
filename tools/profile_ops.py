"""A short torch.profiler look at the fused ops (issue 18): each op's
forward+backward at the benchmark suite's shapes (the steps of
benchmarks/test_*.py's make_step), a few profiled calls each, then the
slowest fused kernel (the cascla_ext kernel with the largest device time per
call over all ops) and the table of its op.

    python tools/profile_ops.py OUT_DIR [--device cuda]

Writes OUT_DIR/profile_<op>_<shape>.txt (key_averages by device time),
OUT_DIR/profile_summary.json (per op: the wall time per call, the top
kernels) and OUT_DIR/profile_slowest_trace.json (a chrome trace of the op
that holds the slowest fused kernel). tools/gpu_check.sh runs it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# Our kernels' names (CUDA: templates in the cascla namespaces; CPU: the op names).
FUSED = ("cascla", "tr_cuda", "forward_step_kernel", "backward_step_kernel", "class_sums_kernel",
         "class_weights_kernel", "anchor_forward_kernel", "anchor_backward_kernel", "gather_rows_kernel",
         "theta_kernel", "ring_kernel", "out_kernel", "ring_grad_kernel", "grad_kernel")


def steps(device: str):
    import test_perturbed_gru as gru
    import test_scla_loss as scla
    import test_tr_attention as tra

    yield "perturbed_gru", "meld_T24_B32", lambda: gru.make_step(device, 24, 32, "fwd_bwd", "fused")
    yield "perturbed_gru", "iemocap_T110_B16", lambda: gru.make_step(device, 110, 16, "fwd_bwd", "fused")
    yield "tr_attention", "meld_T24_B32", lambda: tra.make_step(device, 32, 24, "fwd_bwd", "fused")
    yield "tr_attention", "iemocap_T110_B16", lambda: tra.make_step(device, 16, 110, "fwd_bwd", "fused")
    yield "scla_loss", "M1024", lambda: scla.make_step(device, 1024, "fwd_bwd", "fused")
    yield "scla_loss", "M4096", lambda: scla.make_step(device, 4096, "fwd_bwd", "fused")


def device_time(evt, cuda: bool) -> float:
    """Self device time (us) of a profiler row; the CPU time on the CPU."""
    if not cuda:
        return evt.self_cpu_time_total
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return getattr(evt, name)
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    summary, slowest = {}, None
    for op, shape, make in steps(args.device):
        step = make()
        for _ in range(3):  # warm-up
            step()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(args.calls):
                step()
            if cuda:
                torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.calls
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        (args.out / f"profile_{op}_{shape}.txt").write_text(table + "\n")
        rows = sorted(prof.key_averages(), key=lambda e: device_time(e, cuda), reverse=True)
        top = [{"name": e.key[:160], "us_per_call": device_time(e, cuda) / args.calls,
                "calls_per_step": e.count / args.calls, "fused": any(k in e.key for k in FUSED)}
               for e in rows[:12]]
        summary[f"{op}/{shape}"] = {"wall_ms_per_call": 1e3 * wall, "top": top}
        for row in top:
            if row["fused"] and (slowest is None or row["us_per_call"] > slowest[2]["us_per_call"]):
                slowest = (op, shape, row, prof)
        print(f"{op:14s} {shape:18s} {1e3 * wall:8.3f} ms/call; top: {top[0]['name'][:70]} "
              f"{top[0]['us_per_call']:.1f} us", flush=True)
    if slowest is not None:
        op, shape, row, prof = slowest
        summary["slowest_fused_kernel"] = {"op": op, "shape": shape, **row}
        prof.export_chrome_trace(str(args.out / "profile_slowest_trace.json"))
        print(f"slowest fused kernel: {row['name'][:100]} in {op}/{shape}: {row['us_per_call']:.1f} us per call")
    summary["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    summary["torch"] = torch.__version__
    (args.out / "profile_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
