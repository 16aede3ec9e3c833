"""Why Gradient Canceling, run as its authors ran it (`--gc-recipe authors`), does not hurt their 784-128-10
network here (docs/RESULTS.md, "Gradient Canceling as its authors ran it"): full MNIST, the `gc-nn` defender, epsilon
0.03, float64, one thread.

For a seed: the clean model (their evaluation: 100 epochs of SGD, lr 0.1, batches of 10,000); the attack as the
recipe runs it, with its objective every 100 epochs of their descent, its target's accuracy and the poisons'
pixel range; then their retraining on D_tr U the poisons with the test accuracy after every epoch. Prints one
JSON line.

    python docs/experiments/gc_authors_nn.py --data-root DIR --seed 0
"""
import argparse
import copy
import json

import torch

from tgda_attack import protocol
from tgda_attack.attacks import GradientCancelingAttack
from tgda_attack.config import Config
from tgda_attack.training import accuracy, train_classifier


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = Config.from_dict({"dataset": "mnist", "data_root": args.data_root, "defender": "gc-nn",
                            "attack": "gradient-canceling", "gc_recipe": "authors", "pretrain_batch_size": 10000,
                            "dtype": "float64", "seed": args.seed}).resolved()
    s = protocol.load_splits(cfg)
    x, y = s.x_train, s.y_train
    test = lambda m: 100 * accuracy(m, s.x_test, s.y_test)  # noqa: E731
    clean = protocol.train_defender(cfg, x, y)
    attack = GradientCancelingAttack.from_config(cfg, defender=clean)
    attack.log_every = 100
    x_p, y_p = attack.poison(x, y)
    target = copy.deepcopy(clean)
    target.load_state_dict(attack.target_)
    per_epoch = []
    train_classifier(protocol.new_defender(cfg, tuple(x.shape[1:])), torch.cat([x, x_p]), torch.cat([y, y_p]),
                     epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch_size, lr=cfg.pretrain_lr, seed=cfg.seed,
                     after_epoch=lambda m: per_epoch.append(test(m)))
    clean_acc, worst = test(clean), min(range(len(per_epoch)), key=per_epoch.__getitem__)
    print(json.dumps({"seed": args.seed, "clean_accuracy": clean_acc, "target_test_accuracy": test(target),
                      **attack.info_, "objective": [[h["step"], h["objective"]] for h in attack.history],
                      "poisoned_accuracy_every_10_epochs": per_epoch[::10] + [per_epoch[-1]],
                      "drop_after_100_epochs": clean_acc - per_epoch[-1],
                      "largest_drop": clean_acc - per_epoch[worst], "largest_drop_epoch": worst + 1}))


if __name__ == "__main__":
    main()
