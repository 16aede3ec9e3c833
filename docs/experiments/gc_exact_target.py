"""Gradient Canceling toward a target the budget reaches exactly (docs/RESULTS.md, "Gradient Canceling with valid
pixels"): full MNIST, LR defender, epsilon 0.03, float64, one thread.

For a seed: the defender trained by the protocol (100 epochs of mini-batch gradient descent); min-max's poisons
(box feasible set); the target w_t = the minimiser of the mean cross-entropy on D_tr U those poisons (L-BFGS,
so that w_t is stationary there and the budget reaches it by construction); then Gradient Canceling with valid
pixels toward w_t (1,000 projected Adam steps, lr 0.01) from (a) min-max's own poisons and (b) the clean
sources with labels chosen to cancel (`--gc-labels cancel`). Each set of poisons is evaluated twice: by the
protocol's retraining and by retraining to the minimiser (L-BFGS). Prints one JSON line.

    python docs/experiments/gc_exact_target.py --data-root DIR --seed 0
"""
import argparse
import copy
import json

import torch
import torch.nn.functional as F

from tgda_attack import protocol
from tgda_attack.attacks import ATTACKS, GradientCancelingAttack
from tgda_attack.config import Config
from tgda_attack.training import accuracy


def minimiser(model, x, y, iterations=300):
    """`model` moved to the minimiser of the mean cross-entropy on (x, y) by L-BFGS; (model, gradient norm)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    opt = torch.optim.LBFGS(params, lr=1, max_iter=iterations, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    return model, torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = Config.from_dict({"dataset": "mnist", "data_root": args.data_root, "defender": "lr", "attack": "min-max",
                            "seed": args.seed, "dtype": "float64"}).resolved()
    s = protocol.load_splits(cfg)
    x, y = s.x_train, s.y_train
    test = lambda m: accuracy(m, s.x_test, s.y_test) * 100  # noqa: E731
    clean = protocol.train_defender(cfg, x, y)
    clean_acc = test(clean)
    union = lambda xp, yp: (torch.cat([x, xp]), torch.cat([y, yp]))  # noqa: E731
    drops = lambda xp, yp: {"protocol": clean_acc - test(protocol.train_defender(cfg, *union(xp, yp))),  # noqa: E731
                            "minimiser": clean_acc - test(minimiser(clean, *union(xp, yp))[0])}

    mm = ATTACKS["min-max"].from_config(cfg, defender=clean)
    x_mm, y_mm = mm.poison(x, y, x_val=s.x_val, y_val=s.y_val)
    target, target_gradient = minimiser(clean, *union(x_mm, y_mm))
    result = {"seed": args.seed, "clean_acc": clean_acc, "min-max": drops(x_mm, y_mm),
              "target": {"drop": clean_acc - test(target), "mean_gradient_norm": target_gradient}}
    for name, start in (("gc from min-max poisons", (x_mm, y_mm)), ("gc, cancel labels", None)):
        gc = GradientCancelingAttack(clean, cfg.epsilon, target=target.state_dict(), steps=1000, lr=0.01,
                                     labels="true" if start else "cancel", seed=args.seed)
        x_p, y_p = _from(gc, x, y, *start) if start else gc.poison(x, y)
        norms = [h["gradient_norm"] for h in gc.history]
        result[name] = {"objective_start": norms[0], "objective_end": norms[-1], **drops(x_p, y_p)}
    print(json.dumps(result))


def _from(gc, x, y, x0, y0):
    """Gradient Canceling's loop from given starting poisons and labels (the attack starts at D_tr's points)."""
    model = copy.deepcopy(gc.defender)
    model.load_state_dict(gc.target)
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g_clean = gc.clean_gradient(model, params, x, y)
    return gc.descend(model, params, g_clean, x0.clamp(*gc.pixel_range), y0, len(y)), y0


if __name__ == "__main__":
    main()
