"""Why Gradient Canceling, run as its authors ran it (`--gc-recipe authors`), does not hurt their 784-128-10
network here (README, "Gradient Canceling as its authors ran it"): full MNIST, the `gc-nn` defender, epsilon
0.03, float64, one thread.

For a seed: the clean model (their evaluation: 100 epochs of SGD, lr 0.1, batches of 10,000); their GradPC
target; their descent on the poisons (2,000 epochs, step 10 cosine-decayed, the first layer's summed gradient)
with the objective's norm (`--power 1`, their first upload) or its square (`--power 2`, their HEAD); the
objective every 100 epochs with the largest |pixel| of the poisons in their normalised coordinates; then their
retraining on D_tr U the poisons with the test accuracy after every epoch. Prints one JSON line.

    python docs/experiments/gc_authors_nn.py --data-root DIR --seed 0 [--power 2]
"""
import argparse
import copy
import json
import math

import torch
import torch.nn.functional as F

from tgda_attack import protocol
from tgda_attack.attacks import GradientCancelingAttack
from tgda_attack.attacks.gradient_canceling import AUTHORS_RADIUS, AUTHORS_SCHEDULE, AUTHORS_STOP
from tgda_attack.attacks.targets import authors_gradpc_target
from tgda_attack.config import Config
from tgda_attack.models import MnistStandardize
from tgda_attack.training import _batches, accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--power", type=int, choices=(1, 2), default=1, help="1: the norm; 2: its square")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = Config.from_dict({"dataset": "mnist", "data_root": args.data_root, "defender": "gc-nn",
                            "attack": "gradient-canceling", "gc_recipe": "authors", "pretrain_batch_size": 10000,
                            "dtype": "float64", "seed": args.seed}).resolved()
    s = protocol.load_splits(cfg)
    x, y = s.x_train, s.y_train
    test = lambda m: 100 * accuracy(m, s.x_test, s.y_test)  # noqa: E731
    clean = protocol.train_defender(cfg, x, y)
    out = {"seed": args.seed, "power": args.power, "clean_accuracy": test(clean)}

    attack = GradientCancelingAttack.from_config(cfg, defender=clean)
    model = copy.deepcopy(clean)
    model.load_state_dict(authors_gradpc_target(model, x, y, radius=AUTHORS_RADIUS, seed=args.seed))
    model.eval()
    out.update(target_test_accuracy=test(model), target_train_accuracy=100 * accuracy(model, x, y))
    name = next(iter(model.named_parameters()))[0]
    params = {k: v.detach() for k, v in model.named_parameters()}
    idx = attack._craft_sources(len(y))
    y_p = y[idx].clone()
    a, c = MnistStandardize.SCALE, MnistStandardize.SHIFT
    z = (x[idx] * a + c).detach().clone()
    g_clean = attack._first_gradient(model, params, name, x, y, create_graph=False)
    out["clean_gradient_norm"] = g_clean.norm().item()
    epochs, lr0 = AUTHORS_SCHEDULE["nn"]
    out["objective"] = []  # [epoch, objective, largest |pixel| of the poisons, their coordinates]
    for epoch in range(epochs + 1):
        z.requires_grad_(True)
        objective = (g_clean + attack._first_gradient(model, params, name, (z - c) / a, y_p, create_graph=True)
                     ).norm() ** args.power
        value = objective.item()
        stop = not math.isfinite(value) or value < AUTHORS_STOP or epoch == epochs
        if epoch % 100 == 0 or stop:
            out["objective"].append([epoch, value, z.detach().abs().max().item()])
        if stop:
            break
        (grad,) = torch.autograd.grad(objective, z)
        with torch.no_grad():
            z = z - lr0 * 0.5 * (1 + math.cos(math.pi * epoch / epochs)) * grad
    if math.isfinite(value):  # their retraining, the test accuracy after every epoch
        x_all, y_all = torch.cat([x, (z.detach() - c) / a]), torch.cat([y, y_p])
        net = protocol.new_defender(cfg, tuple(x.shape[1:]))
        generator, weights, per_epoch = torch.Generator().manual_seed(args.seed), list(net.parameters()), []
        for _ in range(cfg.pretrain_epochs):
            net.train()
            for batch in _batches(len(y_all), cfg.pretrain_batch_size, generator):
                grads = torch.autograd.grad(F.cross_entropy(net(x_all[batch]), y_all[batch]), weights)
                with torch.no_grad():
                    for w, g in zip(weights, grads):
                        w.sub_(cfg.pretrain_lr * g)
            per_epoch.append(test(net))
        worst = min(range(len(per_epoch)), key=per_epoch.__getitem__)
        out.update(poisoned_accuracy_every_10_epochs=per_epoch[::10] + [per_epoch[-1]],
                   drop_after_100_epochs=out["clean_accuracy"] - per_epoch[-1],
                   largest_drop=out["clean_accuracy"] - per_epoch[worst], largest_drop_epoch=worst + 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
