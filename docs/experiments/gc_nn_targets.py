"""The NN defender's GradPC targets under the reachability bound, and how far Gradient Canceling's poisons go
toward one (docs/RESULTS.md, "The NN defender: a target the bound admits, poisons too weak to reach it"): full MNIST,
epsilon 0.03, the paper-scale NN of `tgda-attack bench --table 2 --scale paper --defenders nn`.

Given a Gradient Canceling run folder of that bench (its defender_pretrained.pt, poisons.pt and attack.json):
  1. for each relative radius, the GradPC target's budget bound (`targets.necessary_epsilon`) and its train and
     test accuracy;
  2. at the run's own target (the radius its attack.json records), per parameter tensor, the norm of the mean
     gradient over D_tr U D_p of D_tr alone, of D_tr with the poisons' sources, of D_tr with the poisons, of the
     poisons alone, and the cosine between D_tr's and the poisons'.
Prints JSON lines.

    python docs/experiments/gc_nn_targets.py --data-root DIR \
        --run OUT/table_2/gradient-canceling/nn/seed_0
"""
import argparse
import copy
import json
import os

import torch
import torch.nn.functional as F

from tgda_attack import protocol
from tgda_attack.attacks import targets
from tgda_attack.config import Config
from tgda_attack.rundir import load_state, load_weights, read_json, settings_of
from tgda_attack.training import accuracy

RADII = (0.0, 0.01, 0.03, 0.1)


def summed_gradients(model, x, y, batch_size=2000):
    """Per parameter tensor, sum over (x, y) of grad_w cross-entropy (float64)."""
    total = None
    for i in range(0, len(y), batch_size):
        loss = F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum")
        grads = [g.double() for g in torch.autograd.grad(loss, list(model.parameters()))]
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="the folder fetch-mnist.sh filled")
    parser.add_argument("--run", required=True, help="a Gradient Canceling run folder of the NN bench")
    args = parser.parse_args()
    for name in ("config.json", "defender_pretrained.pt", "poisons.pt", "attack.json"):
        if not os.path.exists(os.path.join(args.run, name)):
            parser.error(f"{args.run} has no {name}: give a finished Gradient Canceling run folder")
    try:
        cfg = Config.from_dict({**settings_of(args.run), "data_root": args.data_root}).resolved()
        splits = protocol.load_splits(cfg)
        x, y = splits.x_train, splits.y_train
        model = protocol.new_defender(cfg, tuple(x.shape[1:]))
        load_weights(model, os.path.join(args.run, "defender_pretrained.pt"))
        own = read_json(os.path.join(args.run, "attack.json"))["info"]["target"]["relative_radius"]
        poisons = load_state(os.path.join(args.run, "poisons.pt"), protocol.POISON_FILE)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        parser.error(f"{args.run}: {exc}")
    size = torch.sqrt(sum(p.detach().pow(2).sum() for p in model.parameters())).item()
    for radius in sorted(set(RADII) | {own}):
        probe = copy.deepcopy(model)
        if radius:
            probe.load_state_dict(targets.gradpc_target(model, x, y, radius=radius * size, seed=cfg.seed))
        print(json.dumps({"relative_radius": radius, "necessary_epsilon": targets.necessary_epsilon(probe, x, y),
                          "train_accuracy": accuracy(probe, x, y),
                          "test_accuracy": accuracy(probe, splits.x_test, splits.y_test)}), flush=True)
    model.load_state_dict(targets.gradpc_target(model, x, y, radius=own * size, seed=cfg.seed))
    model.eval()
    x_p, y_p = poisons["x_poison"].to(x.dtype), poisons["y_poison"]
    clean = summed_gradients(model, x, y)
    sources = summed_gradients(model, x[poisons["source_indices"]], y_p)
    poisoned = summed_gradients(model, x_p, y_p)
    n = len(y) + len(y_p)
    for (name, _), c, s, p in zip(model.named_parameters(), clean, sources, poisoned):
        print(json.dumps({"parameter": name, "clean": (c.norm() / n).item(), "clean+sources": ((c + s).norm() / n).item(),
                          "clean+poisons": ((c + p).norm() / n).item(), "poisons": (p.norm() / n).item(),
                          "cosine(clean, poisons)": (torch.dot(c.flatten(), p.flatten()) / (c.norm() * p.norm())).item()}))


if __name__ == "__main__":
    main()
