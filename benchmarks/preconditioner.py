"""Does Jacobi preconditioning help the leader step's solve? (issue 13, hypergrad.preconditioners)

    python benchmarks/preconditioner.py [--defenders lr nn] [--out benchmark-preconditioner]

On the benchmark problems of benchmarks/problems.py (one TGDA leader step, the defender fitted by 100
gradient steps, float64), for CG and MINRES with and without the Jacobi preconditioner (Hutchinson,
32 Rademacher products in one batched call): the iterations to a residual of 1e-3 relative to
||grad_w l|| (at most 300; products counts the 32 of the estimate), and the cosine of the hypergradient after 16 iterations (the leader step's
budget) to a reference (MINRES, 200 iterations, undamped; the same as summary.py's (c)). Writes
OUT.json and OUT.md.
"""
import argparse
import json
import time

import torch

import hypergrad
from contenders import cosine, reference_hypergradient
from problems import leader_step_problem

FIT_STEPS = 100
CASES = {"cg": dict(method="cg"), "cg + jacobi": dict(method="cg", preconditioner="jacobi"),
         "minres": dict(method="minres"), "minres + jacobi": dict(method="minres", preconditioner="jacobi")}


def measure(defender):
    step = leader_step_problem(defender, dtype=torch.float64, fit_steps=FIT_STEPS)
    reference = reference_hypergradient(step)
    hessian = hypergrad.structured_hessian(step.follower_objective(), step.w)
    b = hypergrad.flatten(torch.autograd.grad(step.leader_loss(), step.w))
    rows = []
    for name, settings in CASES.items():
        start = time.perf_counter()
        _, info = hypergrad.Solver(maxiter=300, rtol=1e-3, **settings)(hessian, b)
        seconds = time.perf_counter() - start
        d = hypergrad.flatten(hypergrad.total_grad(step.leader_loss, step.follower_objective(), step.theta, step.w,
                                                   solver=hypergrad.Solver(maxiter=16, rtol=0.0, **settings)))
        estimate = 32 if settings.get("preconditioner") else 0  # Hutchinson's products, one batched call
        rows.append({"defender": defender, "solver": name, "iterations_to_1e-3": int(info.iterations),
                     "converged": bool(info.converged), "negative_curvature": bool(info.negative_curvature),
                     "products": info.num_matvecs + estimate, "seconds": seconds, "cosine_16": cosine(d, reference)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defenders", nargs="+", default=["lr", "nn"])
    parser.add_argument("--out", default="benchmark-preconditioner")
    args = parser.parse_args(argv)
    rows = [row for defender in args.defenders for row in measure(defender)]
    with open(args.out + ".json", "w") as fh:
        json.dump(rows, fh, indent=2)
    lines = ["| defender | solver | iterations to 1e-3 | products | seconds | negative curvature | cosine after 16 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        its = f"{r['iterations_to_1e-3']}" + ("" if r["converged"] else " (not reached)")
        lines.append(f"| {r['defender']} | {r['solver']} | {its} | {r['products']} | {r['seconds']:.2f} "
                     f"| {r['negative_curvature']} | {r['cosine_16']:.3f} |")
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
