"""Times one TGDA leader step: hypergrad.total_grad against the paper's procedure, same run.

    python benchmarks/compare_leader_step.py [--defenders nn] [--dtypes float64 float32] [--repeats 3]

Both use normal-equation CG ("cgnr") with the same number of iterations, so they compute the same
hypergradient; the table gives the median time of each, their ratio and their relative difference.
"""
import argparse
import json
import statistics
import time

import torch

import hypergrad
from paper_procedure import paper_total_grad
from problems import leader_step_problem


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def compare(defender, dtype, iterations, repeats, device):
    step = leader_step_problem(defender, dtype=dtype, device=device)
    ours = lambda: hypergrad.total_grad(step.leader_loss, step.follower_loss, step.theta, step.w,  # noqa: E731
                                        method="cgnr", maxiter=iterations, rtol=0.0)
    paper = lambda: paper_total_grad(step.leader_loss, step.follower_loss, step.theta, step.w,  # noqa: E731
                                     iterations=iterations)
    t_paper, d_paper = _time(paper, repeats)
    t_ours, d_ours = _time(ours, repeats)
    flat_p, flat_o = hypergrad.flatten(d_paper), hypergrad.flatten(d_ours)
    return {"defender": defender, "dtype": str(dtype).replace("torch.", ""), "iterations": iterations,
            "device": device, "paper_s": t_paper, "hypergrad_s": t_ours, "speedup": t_paper / t_ours,
            "rel_diff": ((flat_p - flat_o).norm() / flat_p.norm()).item()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defenders", nargs="+", default=["nn"])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = [compare(d, getattr(torch, t), args.iterations, args.repeats, args.device)
            for d in args.defenders for t in args.dtypes]
    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), "
          f"torch {torch.__version__}, extension: {hypergrad.has_extension()}")
    print("| defender | dtype | cgnr iters | paper procedure (s) | hypergrad.total_grad (s) | speed-up | rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['defender']} | {r['dtype']} | {r['iterations']} | {r['paper_s']:.3f} | {r['hypergrad_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['rel_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
