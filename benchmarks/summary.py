"""All benchmark figures of issue 4 as one table of ratios against their targets, and as JSON.

    .venv/bin/python benchmarks/summary.py [--defenders lr nn cnn cifar-cnn resnet18] [--json FILE]
        [--markdown FILE] [--append]

(a) fused CG update vs a copy of the same bytes, the plain-torch twin and the paper's tensor lists;
(b) one leader step, hypergrad.total_grad vs the paper's procedure, cgnr 16, float64;
(c) the paper's procedure (float64, cgnr 16) vs total_grad with contenders.RECOMMENDED, and the
    cosine of each hypergradient to a long float64 MINRES solve of the undamped system;
(d) hypergrad.solve vs torchopt's solve_cg on the same operator, 16 iterations (if torchopt imports),
    and hypergrad at its best (structured product; on a GPU the solve replayed as a CUDA graph);
(e) 16 CG iterations vs 16 Hessian-vector products alone;
(f) end to end: TGDA batches with the paper's settings (Algorithm 1, cgnr 16, 20 follower steps,
    batch 1000 + 30 poisons, float32), the time per batch (difference of a 6- and a 2-batch epoch,
    so set-up and CUDA-graph recording cancel) projected to the paper's 12,060 MNIST batches and
    set against the paper's hours (LR 1.1 h, NN 15 h on T4/P100 GPUs).
On a GPU, (b) also times total_grad with its solve replayed as a CUDA graph (LR, NN) and (f)
runs with and without cuda_graphs. Parts run in the order a, d, e, f, b, c (cheap first) and the
JSON is rewritten after every row, so an interrupted run keeps what it measured.
Every ratio compares timings taken in this run on this machine (medians, the compared functions
taking turns in every round); the device is named in the output. The builders are in contenders.py, the problems in problems.py.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contenders as c  # noqa: E402
import hypergrad  # noqa: E402
from problems import leader_step_problem  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIT_STEPS = 100  # gradient steps that fit the defender before quality is measured (problems.py)
DAMPING = 1.0  # (d), (e): keeps CG on the NN's indefinite Hessian from stopping before 16 iterations
PAPER_BATCHES = 12_060  # the paper's MNIST schedule (issue 4): 201 epochs of 60 batches
PAPER_MINUTES = {"lr": 1.1 * 60, "nn": 15 * 60, "cnn": 75 * 60}  # TGDA on MNIST in the paper (T4/P100)
TARGETS = {  # (part, device): target ratio, or None where the issue sets none
    ("a", "cpu"): 0.70, ("a", "cuda"): 0.70, ("b", "cpu"): 1.7, ("b", "cuda"): 15.0, ("c", "cpu"): 6.0,
    ("c", "cuda"): None, ("d", "cpu"): None, ("d", "cuda"): 3.0, ("e", "cpu"): 1.15, ("e", "cuda"): 1.15,
    ("f", "cpu"): None, ("f", "cuda"): None,
    ("f", "cuda", "nn"): PAPER_MINUTES["nn"] / 10,  # the NN attack under 10 minutes on one H100
}
_OUTPUT = {"json": None, "markdown": None, "device_name": None}


def _emit(rows, row):
    """Adds a row, prints it at once (a long run shows its progress) and rewrites the JSON."""
    row["target"] = TARGETS.get((row["part"], DEVICE, row.pop("defender", None)), TARGETS.get((row["part"], DEVICE)))
    if row["ratio"] is not None and row["target"] is not None:
        met = row["ratio"] <= row["target"] if row["part"] == "e" else row["ratio"] >= row["target"]
        row["met"] = bool(met)
    rows.append(row)
    ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
    print(f"[{row['part']}] {row['case']}: ratio {ratio} ({row['note']})", flush=True)
    if _OUTPUT["json"]:
        with open(_OUTPUT["json"], "w") as fh:
            json.dump({"device": DEVICE, "device_name": _OUTPUT["device_name"], "torch": torch.__version__,
                       "extension": hypergrad.build_info(), "rows": rows}, fh, indent=2)
    if _OUTPUT["markdown"]:
        with open(_OUTPUT["markdown"], "w") as fh:
            fh.write("\n".join(table(rows)) + "\n")


def table(rows):
    """The rows as a Markdown table, headed by the device they were measured on."""
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"device: {DEVICE} ({_OUTPUT['device_name']}); torch {torch.__version__}; extension: {hypergrad.has_extension()}",
             "", "| part | case | baseline | ours | ratio | target | met | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['part']} | {r['case']} | {fmt(r['baseline'])} | {fmt(r['ours'])} | {ratio} | "
                     f"{fmt(r['target'])} | {r.get('met', '')} | {r['note']} |")
    lines.append("(a: GB/s; b, c, d, e: seconds; f: minutes; ratio = baseline / ours, except e = ours / baseline)")
    return lines


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_seconds(*fns, repeats=3, min_seconds=0.5):
    """Median wall time of each fn (a list, or one float for one fn) over at least `repeats` rounds and
    about min_seconds, after one warm-up call each. The functions take turns within every round, so
    that a shared machine's changing load falls on all of them alike and their ratios stay fair."""
    for fn in fns:
        fn()
    _sync()
    times, start = [[] for _ in fns], time.perf_counter()
    while len(times[0]) < repeats or (time.perf_counter() - start < min_seconds and len(times[0]) < 1000):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _sync()
            ts.append(time.perf_counter() - t0)
    medians = [statistics.median(ts) for ts in times]
    return medians[0] if len(fns) == 1 else medians


def part_a(rows, sizes=(1_000_000, 10_000_000)):
    for n in sizes:
        impls = c.cg_update_contenders(n, device=DEVICE)
        t = dict(zip(impls, median_seconds(*(fn for fn, _ in impls.values()), repeats=20)))
        gbps = {name: impls[name][1] / t[name] / 1e9 for name in t}
        if "fused" in t:
            _emit(rows, dict(part="a", case=f"CG update, n={n:.0e}, float32: fused vs copy (GB/s)",
                             baseline=gbps["copy"], ours=gbps["fused"], ratio=gbps["fused"] / gbps["copy"],
                             note=f"torch twin {t['torch'] / t['fused']:.1f}x, paper lists "
                                  f"{t['paper_lists'] / t['fused']:.1f}x slower than fused"))


def _phase(defender, what, t0):
    """One line on stderr per finished phase, so that a run cut short (gpu_check.sh's time boxes) shows
    where its time went."""
    print(f"  [{defender}] {what}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return time.perf_counter()


def part_b_c(rows, defenders, repeats, reference_iterations):
    for defender in defenders:
        t0 = time.perf_counter()
        # (b) at the defender's initialisation: there both agree to rounding. On a fitted defender
        # cgnr's 16 iterations amplify rounding differences (measured on the NN: 3e-3 between two
        # float64 autograd runs that differ only in summation order), so agreement is checked here.
        step64 = leader_step_problem(defender, dtype=torch.float64, device=DEVICE)
        paper = c.paper_leader_step(step64)
        ours = c.hypergrad_leader_step(step64, "cgnr", 16)
        d_paper, d_ours = paper(), ours()
        t0 = _phase(defender, "(b) first calls of the paper's step and total_grad", t0)
        timed = [paper, ours]
        if DEVICE == "cuda" and hypergrad.linear_chain(step64.follower_objective().model) is not None:
            graphed = c.hypergrad_leader_step(step64, "cgnr", 16, graphs=hypergrad.SolveGraphCache())
            d_graphed = graphed()  # records
            timed.append(graphed)
        t_paper, t_ours, *t_graphed = median_seconds(*timed, repeats=repeats, min_seconds=0)
        _emit(rows, dict(part="b", case=f"leader step, {defender} (batch {step64.batch}), float64, cgnr 16",
                         baseline=t_paper, ours=t_ours, ratio=t_paper / t_ours,
                         note=f"relative difference {c.relative_difference(d_ours, d_paper):.1e}"))
        if t_graphed:
            t_graphed = t_graphed[0]
            _emit(rows, dict(part="b", case=f"leader step, {defender} (batch {step64.batch}), float64, cgnr 16, "
                                            "solve replayed as a CUDA graph",
                             baseline=t_paper, ours=t_graphed, ratio=t_paper / t_graphed,
                             note=f"relative difference {c.relative_difference(d_graphed, d_paper):.1e}; "
                                  f"{t_ours / t_graphed:.2f}x the eager total_grad"))
        t0 = _phase(defender, "(b) timed", t0)
        # (c) on a fitted defender (quality depends on the weights, cost does not); the paper's step is
        # timed again in the same rounds as the recommended one
        rec = c.RECOMMENDED
        fitted64 = leader_step_problem(defender, dtype=torch.float64, device=DEVICE, fit_steps=FIT_STEPS)
        fitted = leader_step_problem(defender, dtype=rec["dtype"], device=DEVICE, fit_steps=FIT_STEPS)
        t0 = _phase(defender, f"(c) two defenders fitted by {FIT_STEPS} steps", t0)
        recommended = c.hypergrad_leader_step(fitted, rec["method"], rec["iterations"], rec["damping"])
        d_rec, d_paper_fitted = recommended(), c.paper_leader_step(fitted64)()
        t_paper, t_rec = median_seconds(paper, recommended, repeats=repeats, min_seconds=0)
        t0 = _phase(defender, "(c) recommended step timed", t0)
        reference = c.reference_hypergradient(fitted64, reference_iterations)
        _phase(defender, f"(c) MINRES-{reference_iterations} reference", t0)
        _emit(rows, dict(part="c", case=f"leader step, {defender}: paper (float64 cgnr 16) vs recommended "
                                        f"({str(rec['dtype']).replace('torch.', '')} {rec['method']} {rec['iterations']}, "
                                        f"damping {rec['damping']})",
                         baseline=t_paper, ours=t_rec, ratio=t_paper / t_rec,
                         note=f"cosine to MINRES-{reference_iterations} on the fitted defender: paper "
                              f"{c.cosine(d_paper_fitted, reference):+.3f}, ours {c.cosine(d_rec, reference):+.3f}"))


def part_d_e(rows, defenders, repeats):
    try:
        import torchopt  # noqa: F401
    except ImportError as exc:
        _emit(rows, dict(part="d", case="torchopt solve_cg", baseline=None, ours=None, ratio=None,
                         note=f"skipped: torchopt does not import ({exc}); pip install torchopt"))
        torchopt = None
    for defender in [d for d in defenders if d in ("lr", "nn")]:
        step = leader_step_problem(defender, dtype=torch.float32, device=DEVICE)
        op, tree_matvec, b = c.hessian_system(step)
        damping = DAMPING
        iterations = int(hypergrad.solve(op, b, method="cg", maxiter=16, rtol=0.0, damping=damping)[1].iterations)
        if iterations != 16:
            raise RuntimeError(f"CG stopped after {iterations} iterations on {defender}: not at equal iterations")
        ours = c.hypergrad_solve(op, b, "cg", 16, damping)
        t_ours, t_matvecs = median_seconds(ours, c.matvecs_alone(op, b, 16, damping), repeats=repeats)
        if torchopt is not None:
            theirs = c.torchopt_cg(tree_matvec, b, step.w, 16, damping)
            graphs = hypergrad.SolveGraphCache() if DEVICE == "cuda" else None
            best = c.hypergrad_structured_solve(step, b, "cg", 16, damping, graphs)
            t_hypergrad, t_theirs, t_best = median_seconds(ours, theirs, best, repeats=repeats)
            _emit(rows, dict(part="d", case=f"CG 16 iterations, {defender}, float32: torchopt vs hypergrad.solve",
                             baseline=t_theirs, ours=t_hypergrad, ratio=t_theirs / t_hypergrad,
                             note=f"relative difference {c.relative_difference(ours(), theirs()):.1e}"))
            how = "structured product, solve replayed as a CUDA graph" if graphs else "structured product"
            _emit(rows, dict(part="d", case=f"CG 16 iterations, {defender}, float32: torchopt (autograd product) vs "
                                            f"hypergrad ({how})",
                             baseline=t_theirs, ours=t_best, ratio=t_theirs / t_best,
                             note=f"relative difference {c.relative_difference(best(), theirs()):.1e}"))
        _emit(rows, dict(part="e", case=f"solver overhead, {defender}, float32: 16 CG iterations / 16 products",
                         baseline=t_matvecs, ours=t_ours, ratio=t_ours / t_matvecs, note="lower is better"))


def part_f(rows, defenders, repeats):
    """Time per TGDA batch = (t(6 batches) - t(2 batches)) / 4, projected to PAPER_BATCHES."""
    short, long = 2, 6
    for defender in [d for d in defenders if d in PAPER_MINUTES]:
        if defender == "cnn" and DEVICE != "cuda":
            continue  # minutes per batch on 2 CPU cores
        for graphs in ([False, True] if DEVICE == "cuda" and defender != "cnn" else [False]):
            t_short, t_long = median_seconds(c.tgda_batches(defender, short, graphs, device=DEVICE),
                                             c.tgda_batches(defender, long, graphs, device=DEVICE),
                                             repeats=repeats, min_seconds=0)
            per_batch = max(t_long - t_short, 0.0) / (long - short)
            minutes = per_batch * PAPER_BATCHES / 60
            _emit(rows, dict(part="f", case=f"TGDA attack, {defender}, paper's MNIST schedule ({PAPER_BATCHES} batches "
                                            f"of 1000 + 30 poisons, cgnr 16, n = 20, float32"
                                            f"{', CUDA graphs' if graphs else ''}): paper vs projected (minutes)",
                             baseline=PAPER_MINUTES[defender], ours=minutes, ratio=PAPER_MINUTES[defender] / minutes,
                             defender=defender,
                             note=f"{per_batch * 1e3:.1f} ms per batch (epochs of {short} and {long} batches: "
                                  f"{t_short:.2f} s, {t_long:.2f} s); the paper's time is on T4/P100 GPUs"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ResNet-18's float64 rows take over 20 minutes on 2 CPU cores: on a CPU it runs only when named
    default = ["lr", "nn", "cnn", "cifar-cnn"] + (["resnet18"] if DEVICE == "cuda" else [])
    parser.add_argument("--defenders", nargs="+", default=default)
    parser.add_argument("--parts", default="abcdef")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-iterations", type=int, default=200)
    parser.add_argument("--json", default="benchmark-summary.json")
    parser.add_argument("--markdown", help="also write the table here (rewritten after every row)")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --json (measured on the same device) and add to them")
    args = parser.parse_args(argv)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    _OUTPUT.update(json=args.json, markdown=args.markdown, device_name=device_name)
    rows = []
    if args.append and os.path.exists(args.json):
        with open(args.json) as fh:
            earlier = json.load(fh)
        if earlier.get("device_name") != device_name:
            parser.error(f"--append: {args.json} was measured on {earlier.get('device_name')}, not on {device_name}")
        rows = earlier["rows"]
    if "a" in args.parts:
        part_a(rows)
    if "d" in args.parts or "e" in args.parts:
        part_d_e(rows, args.defenders, args.repeats)
    if "f" in args.parts:
        part_f(rows, args.defenders, args.repeats)
    if "b" in args.parts or "c" in args.parts:
        part_b_c(rows, args.defenders, args.repeats, args.reference_iterations)
    print("\n".join(table(rows)))
    print(f"wrote {args.json}" + (f" and {args.markdown}" if args.markdown else ""))
    return rows


if __name__ == "__main__":
    main()
