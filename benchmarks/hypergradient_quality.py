"""How good is each solver's hypergradient on a real attack state? (a diagnostic for issues 3 and 4)

    python benchmarks/hypergradient_quality.py RUN_DIR [--batch 100] [--reference-iterations 200]

RUN_DIR is a `tgda-attack pretrain` (or run) output folder. For one batch of D_tr (plus its share of
poisons) and of D_v, in float64, it computes D_theta l with several solver settings and prints
the solve's final residual, |D|, and the cosine of D to a reference solve (MINRES with many
iterations of the undamped system, which is indefinite: CG would stop at negative curvature).
"""
import argparse
import time

import torch
import torch.nn.functional as F

import hypergrad
from tgda_attack import protocol

SETTINGS = {
    "cgnr, 16 (the paper's)": dict(method="cgnr", maxiter=16, rtol=0.0),
    "cg, 16": dict(method="cg", maxiter=16, rtol=0.0),
    "cg, 16, damping 0.1": dict(method="cg", maxiter=16, rtol=0.0, damping=0.1),
    "minres, 16": dict(method="minres", maxiter=16, rtol=0.0),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--reference-iterations", type=int, default=200)
    args = parser.parse_args(argv)
    cfg = protocol.run_config(args.run_dir)
    splits = protocol.load_splits(cfg)
    defender = protocol.new_defender(cfg, splits.image_shape)
    defender.load_state_dict(torch.load(f"{args.run_dir}/defender_pretrained.pt", weights_only=True))
    attacker = protocol.new_attacker(cfg, splits.image_shape)
    attacker.load_state_dict(torch.load(f"{args.run_dir}/attacker_pretrained.pt", weights_only=True))
    defender.double()
    attacker.double()
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(splits.y_train), generator=g)[:args.batch]
    vv = torch.randperm(len(splits.y_val), generator=g)[:args.batch]
    n_p = max(1, int(cfg.epsilon * args.batch))
    x_b, y_b = splits.x_train[tr].double(), splits.y_train[tr]
    x_p, y_p = splits.x_train[:n_p].double(), splits.y_train[:n_p]
    x_v, y_v = splits.x_val[vv].double(), splits.y_val[vv]
    w, theta = list(defender.parameters()), list(attacker.parameters())

    def follower_loss():
        return F.cross_entropy(defender(torch.cat([x_b, attacker(x_p, y_p)])), torch.cat([y_b, y_p]))

    def leader_loss():
        return F.cross_entropy(defender(x_v), y_v)

    print(f"{cfg.defender} defender, batch {args.batch} + {n_p} poisons: follower loss {follower_loss().item():.4g}, "
          f"leader loss {leader_loss().item():.4g}")
    settings = {**SETTINGS, f"minres, {args.reference_iterations} (reference)":
                dict(method="minres", maxiter=args.reference_iterations, rtol=1e-10)}
    results = {}
    for name, kwargs in settings.items():
        start = time.perf_counter()
        d, info = hypergrad.total_grad(leader_loss, follower_loss, theta, w, return_info=True, **kwargs)
        results[name] = (hypergrad.flatten(d), info, time.perf_counter() - start)
    reference = results[list(settings)[-1]][0]
    print("| solver | time (s) | iterations | residual | negative curvature | abs(D) | cosine to reference |")
    print("|---|---|---|---|---|---|---|")
    for name, (d, info, seconds) in results.items():
        cosine = torch.dot(d, reference) / (d.norm() * reference.norm())
        print(f"| {name} | {seconds:.1f} | {int(info.iterations)} | {info.residual_norm.item():.3g} | "
              f"{bool(info.negative_curvature)} | {d.norm().item():.3g} | {cosine.item():+.3f} |")


if __name__ == "__main__":
    main()
