"""Where the time of a leader step and of a TGDA batch goes: a torch.profiler summary (issue 12).

    python benchmarks/profile_step.py [--defenders nn lr] [--out profile.md] [--json profile.json]

For each case, after warm-up calls, `--calls` calls are profiled (CPU and, on a GPU, CUDA activity)
and summarised per call: wall time, GPU busy time (the sum of kernel and copy times), kernel
launches (cudaLaunchKernel and its variants), CUDA-graph launches, host synchronisations (stream,
device and event synchronisations and device-to-host copies), and the time and count of the matrix
products (GEMM kernels); then the operators that take the most device (or CPU) time. The cases are
those of summary.py: (b) one leader step of Lu, Kamath & Yu (TMLR 2022), eq. 15-17, by the paper's
procedure and by hypergrad.total_grad (eager, and on a GPU with the solve replayed as a CUDA graph),
float64, cgnr 16; (f) one TGDA batch of Algorithm 1 (20 follower steps, float32), eager and with
CUDA graphs. The Markdown and JSON are rewritten after every case and name the device.
"""
import argparse
import json
import os
import platform
import re
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contenders as c  # noqa: E402
import hypergrad  # noqa: E402
from problems import leader_step_problem  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAUNCH = re.compile(r"^(cudaLaunchKernel|cudaLaunchKernelExC|cuLaunchKernel|cuLaunchKernelEx|cudaLaunchCooperativeKernel)")
GRAPH_LAUNCH = re.compile(r"^(cudaGraphLaunch|cuGraphLaunch)")
SYNC = re.compile(r"^(cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cuStreamSynchronize|"
                  r"cuCtxSynchronize|cuEventSynchronize)")
DTOH = re.compile(r"Memcpy DtoH|Memcpy Device -> Pageable|DtoH")
GEMM = re.compile(r"gemm|cutlass|nvjet|xmma|cublas|matmul|gemv", re.IGNORECASE)


def _device_time_us(event):
    for name in ("device_time", "cuda_time"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _is_device_event(event):
    kind = getattr(event, "device_type", None)
    return kind is not None and "CPU" not in str(kind)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def summarise(fn, calls=5, warmup=2):
    """Profiles `calls` calls of fn (after `warmup`); returns per-call counts and two operator tables."""
    for _ in range(warmup):
        fn()
    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        wall = (time.perf_counter() - start) / calls
    events = prof.events()
    device_events = [e for e in events if _is_device_event(e)]
    names = [e.name for e in events if not _is_device_event(e)]
    gemm = [e for e in device_events if GEMM.search(e.name)]
    per_call = {
        "wall_ms": 1e3 * wall,
        "gpu_busy_ms": sum(_device_time_us(e) for e in device_events) / 1e3 / calls,
        "kernel_launches": sum(bool(LAUNCH.match(n)) for n in names) / calls,
        "graph_launches": sum(bool(GRAPH_LAUNCH.match(n)) for n in names) / calls,
        "host_syncs": sum(bool(SYNC.match(n)) for n in names) / calls,
        "device_to_host_copies": sum(bool(DTOH.search(e.name)) for e in device_events) / calls,
        "gemm_kernels": len(gemm) / calls,
        "gemm_ms": sum(_device_time_us(e) for e in gemm) / 1e3 / calls,
        "device_kernels": len(device_events) / calls,
    }
    averages = prof.key_averages()
    sort = "self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    try:
        by_device = averages.table(sort_by=sort, row_limit=15, max_name_column_width=60)
    except (AttributeError, KeyError, ValueError):  # older torch names the column self_cuda_time_total
        by_device = averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)
    by_cpu = averages.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60)
    return per_call, by_device, by_cpu


def cases(defender):
    """(name, callable) of every profiled case for one defender."""
    step64 = leader_step_problem(defender, dtype=torch.float64, device=DEVICE)
    out = [(f"(b) leader step, {defender}, float64, cgnr 16: paper's procedure", c.paper_leader_step(step64)),
           (f"(b) leader step, {defender}, float64, cgnr 16: total_grad", c.hypergrad_leader_step(step64, "cgnr", 16))]
    chain = hypergrad.linear_chain(step64.follower_objective().model) is not None
    if DEVICE == "cuda" and chain:
        out.append((f"(b) leader step, {defender}, float64, cgnr 16: total_grad, CUDA-graph solve",
                    c.hypergrad_leader_step(step64, "cgnr", 16, graphs=hypergrad.SolveGraphCache())))
    for graphs in ([False, True] if DEVICE == "cuda" and chain else [False]):
        out.append((f"(f) TGDA epoch of 2 batches, {defender}, float32{', CUDA graphs' if graphs else ''}",
                    c.tgda_batches(defender, 2, graphs, device=DEVICE)))
    return out


def _write(path_md, path_json, header, results):
    if path_json:
        with open(path_json, "w") as fh:
            json.dump({**header, "cases": [{"case": name, **per_call} for name, per_call, _, _ in results]}, fh, indent=2)
    if path_md:
        lines = [f"# Profile of the leader step and the TGDA batch on {header['device_name']}", "",
                 f"torch {header['torch']}, extension {header['extension']}; per call, mean of "
                 f"{header['calls']} profiled calls after warm-up.", "",
                 "| case | wall ms | GPU busy ms | kernel launches | graph launches | host syncs | DtoH copies | "
                 "GEMM kernels | GEMM ms |", "|---|---|---|---|---|---|---|---|---|"]
        for name, p, _, _ in results:
            lines.append(f"| {name} | {p['wall_ms']:.2f} | {p['gpu_busy_ms']:.2f} | {p['kernel_launches']:.0f} | "
                         f"{p['graph_launches']:.0f} | {p['host_syncs']:.0f} | {p['device_to_host_copies']:.0f} | "
                         f"{p['gemm_kernels']:.0f} | {p['gemm_ms']:.2f} |")
        for name, _, by_device, by_cpu in results:
            lines += ["", f"## {name}", "", f"By self {'device' if DEVICE == 'cuda' else 'CPU'} time:", "```",
                      by_device, "```", "By total CPU time:", "```", by_cpu, "```"]
        with open(path_md, "w") as fh:
            fh.write("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defenders", nargs="+", default=["nn", "lr"], choices=["lr", "nn", "cnn"])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--out", default="profile.md", help="Markdown summary")
    parser.add_argument("--json", default=None, help="per-call counts as JSON")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    device_name = (torch.cuda.get_device_name() if DEVICE == "cuda"
                   else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads")
    header = {"device": DEVICE, "device_name": device_name, "torch": torch.__version__,
              "extension": hypergrad.has_extension(), "calls": args.calls}
    results = []
    for defender in args.defenders:
        for name, fn in cases(defender):
            per_call, by_device, by_cpu = summarise(fn, calls=args.calls)
            results.append((name, per_call, by_device, by_cpu))
            print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in per_call.items()), flush=True)
            _write(args.out, args.json, header, results)
    print(f"device: {DEVICE} ({device_name}); wrote {args.out}")


if __name__ == "__main__":
    main()
