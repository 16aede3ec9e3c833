"""What a run reports beside the accuracies of the protocol of Lu, Kamath & Yu (TMLR 2022): how far
the poisons moved from their clean sources and how diverse they are, and the mean and standard
deviation of a metric over seeds."""
import statistics

import torch

SUMMARY_KEYS = ("clean_accuracy", "poisoned_accuracy", "accuracy_drop", "attack_seconds")
MEDIAN_DROP = "accuracy_drop_median_last_epochs"  # protocol: between the medians of the trainings' last epochs
# summary.json's numbers, as metrics.json's, are fractions (the tables print them in percent)
SUMMARY_UNITS = ("fractions: accuracies, drops, precision, recall (0.857 is 85.7%); seconds: attack_seconds; pixel "
                 "units of the data's [-1, 1] range: perturbations; counts: removals")
POISON_KEYS = ("mean_perturbation_l2", "mean_perturbation_linf", "max_perturbation_linf", "poison_pairwise_l2",
               "source_pairwise_l2")


def poison_statistics(x_source, x_poison):
    """How far the poisons moved from their clean sources (the mean L2 distance, and the L-infinity distance,
    the largest change of one pixel, as a mean over poisons and a maximum, the paper's Figure 5 measure) and
    how diverse they are (mean pairwise L2 distances over flattened images). A poison_pairwise_l2 far below
    source_pairwise_l2 means the attacker has collapsed many poisons onto one image."""
    src, poi = x_source.flatten(1).double(), x_poison.flatten(1).double()
    n = len(poi)

    def mean_pairwise(x):
        return (torch.cdist(x, x).sum() / (n * (n - 1))).item() if n > 1 else 0.0

    linf = (poi - src).abs().amax(dim=1) if n else torch.zeros(1, dtype=torch.float64)
    return {"mean_perturbation_l2": (poi - src).norm(dim=1).mean().item(),
            "mean_perturbation_linf": linf.mean().item(), "max_perturbation_linf": linf.max().item(),
            "poison_pairwise_l2": mean_pairwise(poi), "source_pairwise_l2": mean_pairwise(src)}


def mean_std(values):
    """Mean and sample standard deviation (n - 1) of `values`; the deviation None for one value (no spread
    measured), both None for none."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(runs):
    """Mean and sample standard deviation (n - 1) over seeds of the metrics of several runs (std None for one run); the
    drop between the medians of the last epochs where every run recorded it."""
    keys = SUMMARY_KEYS + tuple(k for k in POISON_KEYS + (MEDIAN_DROP,) if all(isinstance(r.get(k), (int, float))
                                                                              for r in runs))
    summary = {"seeds": [r["seed"] for r in runs], **{k: runs[0][k] for k in ("dataset", "defender", "attack", "epsilon")},
               "eval_defender": runs[0].get("eval_defender") or runs[0]["defender"],  # whose accuracies these are
               "units": SUMMARY_UNITS}
    for k in keys:
        summary[k] = dict(zip(("mean", "std"), mean_std([r[k] for r in runs])))
    return summary


DEFENSE_SUMMARY_KEYS = ("defended_accuracy", "clean_defended_accuracy", "defended_drop", "attack_drop_under_defense",
                        "attack_drop_under_defense_median_last_epochs", "poisons_removed", "clean_removed", "precision",
                        "recall")


def summarize_defense(results):
    """Mean and sample standard deviation over seeds of several runs' results under one defense (protocol.stage_defend),
    each key where every run recorded a number (a filter's removals and precision; not a robust training's)."""
    summary = {"defense": results[0]["defense"], "kind": results[0]["kind"],
               "defense_settings": results[0]["defense_settings"], "seeds": [r["seed"] for r in results],
               "units": SUMMARY_UNITS}
    for k in DEFENSE_SUMMARY_KEYS:
        if all(isinstance(r.get(k), (int, float)) for r in results):
            summary[k] = dict(zip(("mean", "std"), mean_std([r[k] for r in results])))
    return summary
