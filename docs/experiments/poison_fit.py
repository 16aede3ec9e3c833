"""Does the defender fit the poisons, and does fitting them cost it the clean data? For each model of a finished
run folder (tgda_attack.protocol: the clean defender_pretrained.pt, the attack's own defender_attacked.pt where
the attack keeps one, the retrained defender_poisoned.pt), the accuracy on D_test and on the clean D_tr, and on
the poisons with the labels the attack gave them ("poisons fit") with their mean cross-entropy.

A defender that fits nearly every poison while its test accuracy stays put has isolated the poisons (a network
of enough capacity memorises them); one that fits few of them was not moved to their labels. Both say why a
drop is small, in numbers (docs/RESULTS.md, "Table 2 at paper scale, NN defender").

    python docs/experiments/poison_fit.py RUN [RUN ...]

Nothing is trained; the models are read with torch.load(weights_only=True).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

from tgda_attack import protocol
from tgda_attack.config import Config
from tgda_attack.rundir import RunFolderError, load_state, load_weights, need, settings_of

MODELS = ("defender_pretrained", "defender_attacked", "defender_poisoned")


def batched(model, x, size=2000):
    with torch.no_grad():
        return torch.cat([model(x[i:i + size]) for i in range(0, len(x), size)])


def fit_report(out):
    """[(model name, test accuracy, train accuracy, poisons fit, poisons' mean loss)] of the run folder `out`."""
    need(out, "config.json")
    need(out, "poisons.pt")
    cfg = Config.from_dict(settings_of(out)).resolved()
    splits = protocol.load_splits(cfg)
    poisons = load_state(os.path.join(out, "poisons.pt"))
    x_p = poisons["x_poison"].to(splits.x_train.device, splits.x_train.dtype)
    y_p = poisons["y_poison"].to(splits.y_train.device)
    rows = []
    for name in MODELS:
        path = os.path.join(out, f"{name}.pt")
        if not os.path.exists(path):
            continue
        model = protocol.new_defender(cfg, tuple(splits.x_train.shape[1:]))
        load_weights(model, path)
        model.eval()
        logits = batched(model, x_p)
        rows.append((name, (batched(model, splits.x_test).argmax(1) == splits.y_test).float().mean().item(),
                     (batched(model, splits.x_train).argmax(1) == splits.y_train).float().mean().item(),
                     (logits.argmax(1) == y_p).float().mean().item(), F.cross_entropy(logits, y_p).item()))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run folders (tgda-attack run --out, or a bench's seed_K)")
    args = parser.parse_args(argv)
    print("| run | model | test acc. (%) | train acc. (%) | poisons fit (%) | poisons' loss |")
    print("|---|---|---|---|---|---|")
    for out in args.runs:
        try:
            rows = fit_report(out)
        except (OSError, RunFolderError, ValueError, TypeError, KeyError) as exc:
            print(f"poison_fit.py: {out}: {exc}", file=sys.stderr)
            return 2
        for name, test, train, fit, loss in rows:
            print(f"| {out} | {name} | {100 * test:.2f} | {100 * train:.2f} | {100 * fit:.2f} | {loss:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
