"""Who decides a drop, the poisons or the defender's training seed: the retrainings of a bench run, as a matrix.

A bench run with `--set retrainings=K` retrains each seed's poisons under the training seeds seed .. seed+K-1
(tgda_attack.protocol, `retrainings` in metrics.json). Neighbouring attack seeds share training seeds, so each
training seed t is seen with the poisons of several attack seeds. This prints, for each Table 2 row of one
column, the drops (points) as a matrix of attack seed x training seed, the mean drop of each training seed,
and how much of the spread the training seed explains: the between-training-seed share of the drops'
variance (1: the training seed alone decides; 0: the poisons alone).

    python docs/experiments/retraining_matrix.py --bench OUT [--column lr]

OUT is the bench's --out folder. Nothing is recomputed: it reads the run folders' metrics.json.
"""
import argparse
import glob
import os
import statistics
import sys

from tgda_attack.attacks import ATTACKS
from tgda_attack.bench import _rows
from tgda_attack.rundir import RunFolderError, read_json


def row_names(column):
    """{row folder: Table 2 row name} (the folder of "min-max (box)" is "min-max", of "min-max" "min-max_sanitized")."""
    return {folder or row: row for attack in ATTACKS for row, _, folder in _rows(attack, column)}


def drops_by_seed(row_dir, column):
    """{(attack seed, training seed): drop in points} of one Table 2 row folder."""
    drops = {}
    for path in sorted(glob.glob(os.path.join(row_dir, column, "seed_*", "metrics.json"))):
        retrainings = read_json(path).get("retrainings")
        if not isinstance(retrainings, dict):
            raise RunFolderError(f"{path} has no 'retrainings': run the bench with --set retrainings=K (K > 1)")
        seed = int(os.path.basename(os.path.dirname(path))[len("seed_"):])
        for t, d in zip(retrainings["seeds"], retrainings["accuracy_drop"]):
            if d is not None:  # a diverged retraining is recorded as None
                drops[seed, t] = 100 * d
    return drops


def between_share(drops):
    """Share of the drops' variance that lies between training seeds (a one-way decomposition)."""
    values = list(drops.values())
    mean = statistics.fmean(values)
    total = sum((v - mean) ** 2 for v in values)
    by_t = {}
    for (_, t), v in drops.items():
        by_t.setdefault(t, []).append(v)
    between = sum(len(vs) * (statistics.fmean(vs) - mean) ** 2 for vs in by_t.values())
    return between / total if total > 0 else float("nan")


def markdown(name, drops):
    seeds = sorted({s for s, _ in drops})
    trainings = sorted({t for _, t in drops})
    lines = [f"#### {name}", "", "| attack seed \\ training seed | " + " | ".join(map(str, trainings)) + " |",
             "|---|" + "---|" * len(trainings)]
    for s in seeds:
        cells = [f"{drops[s, t]:.2f}" if (s, t) in drops else "" for t in trainings]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    means = [statistics.fmean([v for (_, tt), v in drops.items() if tt == t]) for t in trainings]
    lines.append("| mean | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    values = list(drops.values())
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    lines += ["", f"{len(values)} drops, {statistics.fmean(values):.2f} ± {spread:.2f}; mean over the "
              f"{len(trainings)} training seeds {statistics.fmean(means):.2f}; share of the variance between "
              f"training seeds: {between_share(drops):.2f}", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="the --out folder of a bench run with --set retrainings=K")
    parser.add_argument("--column", default="lr", help="the Table 2 column (defender) to read (default: lr)")
    args = parser.parse_args()
    rows = sorted(glob.glob(os.path.join(args.bench, "table_2", "*", args.column)))
    if not rows:
        parser.error(f"{args.bench} has no table_2/*/{args.column} run folders: give a bench --out folder")
    names = row_names(args.column)
    try:
        for row in rows:
            row_dir = os.path.dirname(row)
            drops = drops_by_seed(row_dir, args.column)
            if drops:
                print(markdown(names.get(os.path.basename(row_dir), os.path.basename(row_dir)), drops))
    except (RunFolderError, ValueError, KeyError, TypeError, OSError) as exc:
        print(f"retraining_matrix.py: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
