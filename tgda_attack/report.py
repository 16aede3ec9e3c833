"""Files a person reads: the figure of clean points beside their poisons, and Markdown tables."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import RETRAINING_SEED_STRIDE, retraining_seeds  # noqa: E402
from .metrics import MEDIAN_DROP, summarize, summarize_defense  # noqa: E402


def save_poison_figure(x_clean, x_poison, y_clean, y_poison, path, k=8):
    """Top row: clean starting points; bottom row: their poisons; the k with the largest change."""
    change = (x_poison - x_clean).flatten(1).norm(dim=1)
    order = change.argsort(descending=True)[:k]
    fig, axes = plt.subplots(2, len(order), figsize=(1.6 * max(len(order), 4), 4.2), squeeze=False)  # room for the title
    for col, i in enumerate(order.tolist()):
        for row, (img, label) in enumerate(((x_clean[i], y_clean[i]), (x_poison[i], y_poison[i]))):
            ax = axes[row][col]
            shown = ((img.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0)
            ax.imshow((shown.squeeze(-1) if shown.shape[-1] == 1 else shown).numpy(), cmap="gray", vmin=0, vmax=1)
            title = f"y={int(label)}" + (f"\n|dx|={change[i]:.2f}" if row == 1 else "")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    axes[0][0].text(-0.3, 0.5, "clean", transform=axes[0][0].transAxes, rotation=90, va="center", ha="right")
    axes[1][0].text(-0.3, 0.5, "poison", transform=axes[1][0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle("Clean starting points (top) and their poisons (bottom), largest pixel change first", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path):
    """The figure as a PNG at `path`, written whole or not at all (a kill while it was written left a 0-byte PNG
    beside tables of the new runs), then closed."""
    tmp = path + ".tmp"
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


# What an edited or damaged results file raises in the readers below (a key deleted, a list emptied, a string
# where a number was)
_UNREADABLE = (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError)


def readable_run(metrics):
    """Whether a run's metrics.json holds everything its printout and the seeds' summary read (protocol.finished_
    evaluation computes one that does not again, as a damaged file)."""
    try:
        metrics_table(metrics)
        summarize([metrics])
    except _UNREADABLE:
        return False
    return True


def readable_defense(metrics):
    """Whether a defense's metrics.json holds everything its printout and the seeds' summary read."""
    try:
        defense_table(metrics)
        summarize_defense([metrics])
    except _UNREADABLE:
        return False
    return True


def _pct(x):
    return f"{100 * x:.2f}"


def metrics_table(metrics):
    """One run as a Markdown table."""
    spread = ""
    if "poison_pairwise_l2" in metrics:
        spread = f"{metrics['mean_perturbation_l2']:.2f} | {metrics['poison_pairwise_l2']:.2f} / {metrics['source_pairwise_l2']:.2f} |"
    return "\n".join([
        "| clean accuracy (%) | poisoned accuracy (%) | drop (points) | attack time (s) |"
        + (" poison perturbation (L2) | pairwise L2, poisons / sources |" if spread else ""),
        "|---|---|---|---|" + ("---|---|" if spread else ""),
        f"| {_pct(metrics['clean_accuracy'])} | {_pct(metrics['poisoned_accuracy'])} | "
        f"{_pct(metrics['accuracy_drop'])} | {metrics['attack_seconds']:.1f} |" + (f" {spread}" if spread else ""),
    ]) + _last_epochs_line(metrics) + _retrainings_line(metrics)


def _last_epochs_line(metrics, clean=("clean", "clean_accuracy_last_epochs"),
                      poisoned=("poisoned", "poisoned_accuracy_last_epochs"), drop="accuracy_drop"):
    """The test accuracies over the last epochs (protocol.LAST_EPOCHS) of a run's clean and poisoned trainings (each a
    (name, metrics key)) and the drop between their medians, or "" for a run recorded without them."""
    (clean_name, clean), (poisoned_name, poisoned) = ((n, metrics.get(k)) for n, k in (clean, poisoned))
    if not poisoned:
        return ""
    def span(entry):
        return f"median {_pct(entry['median'])} (range {_pct(min(entry['accuracy']))}-{_pct(max(entry['accuracy']))})"
    line = f"\n\nTest accuracy (%) over the last {len(poisoned['accuracy'])} epochs: {poisoned_name} {span(poisoned)}"
    if clean:
        line += f", {clean_name} {span(clean)}; drop between the medians {_pct(metrics[f'{drop}_median_last_epochs'])} points"
        if isinstance(metrics.get(f"{drop}_mean_last_epochs"), (int, float)):
            line += f", between the means {_pct(metrics[f'{drop}_mean_last_epochs'])}"
    spiked = [name for name, entry in ((clean_name, clean), (poisoned_name, poisoned)) if entry and entry["spike"]]
    if spiked:
        line += (f". The {' and the '.join(spiked)} " + ("accuracies above are readings of their trainings'" if len(spiked) > 1
                                                       else "accuracy above is a reading of its training's")
                 + " last epoch, off the median of its last epochs by more than a point: read the median"
                 + ("s' drop" if clean else ""))
    return line + "."


def _retrainings_line(metrics):
    """The drop over the run's retrainings (protocol stage 3 with `retrainings` > 1), or "" without them."""
    r = metrics.get("retrainings")
    if not r:
        return ""
    def pct(v):
        return "—" if v is None else _pct(v)
    diverged = f"; {len(r['diverged_seeds'])} diverged" if r.get("diverged_seeds") else ""
    medians = ""
    if r.get("accuracy_drop_median_last_epochs_mean") is not None:
        spiked = f"; seeds {', '.join(map(str, r['spiked_seeds']))} spiked" if r.get("spiked_seeds") else ""
        medians = (f"; between the medians of the last epochs {pct(r['accuracy_drop_median_last_epochs_mean'])} ± "
                   f"{pct(r['accuracy_drop_median_last_epochs_std'])} (per seed "
                   + " / ".join(pct(d) for d in r["accuracy_drop_median_last_epochs"]) + spiked + ")")
    return (f"\n\nDrop over {len(r['seeds'])} retrainings (training seeds {_seeds_text(r['seeds'])}, the poisons "
            f"fixed): {pct(r['accuracy_drop_mean'])} ± {pct(r['accuracy_drop_std'])} points (per seed "
            + " / ".join("diverged" if d is None else _pct(d) for d in r["accuracy_drop"]) + diverged + ")" + medians)


def _seeds_text(seeds):
    """Retraining seeds as a run records them: "0 + k * 2^20, k = 0 .. 4" (config.retraining_seeds), or listed (a run
    of the code before it: seed .. seed+K-1)."""
    if len(seeds) > 1 and list(seeds) == retraining_seeds(seeds[0], len(seeds)):
        return f"{seeds[0]} + k * 2^{RETRAINING_SEED_STRIDE.bit_length() - 1}, k = 0 .. {len(seeds) - 1}"
    return f"{seeds[0]}-{seeds[-1]}"


def tested_defender(metrics):
    """The defender whose accuracies a run's (or a summary's) metrics are, naming the surrogate the poisons were made
    against where that is another network (transfer: --eval-defender)."""
    tested = metrics.get("eval_defender") or metrics["defender"]
    return tested if tested == metrics["defender"] else f"{tested} (poisons made against {metrics['defender']})"


def mean_std_text(mean, std, digits=2):
    """"mean ± std", the mean alone where no spread was measured (std None), "—" without a mean."""
    return "—" if mean is None else f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_table(summaries):
    """Several summaries (mean and std over seeds) as a Markdown table."""
    medians = any(MEDIAN_DROP in s for s in summaries)
    lines = ["| dataset | defender | attack | seeds | clean acc. (%) | poisoned acc. (%) | drop (points) | "
             + ("drop, medians of the last epochs | " if medians else "") + "attack time (s) |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if medians else "")]
    for s in summaries:
        def ms(key, scale=100.0):
            if key not in s:
                return "—"
            std = s[key]["std"]
            return mean_std_text(scale * s[key]["mean"], None if std is None else scale * std)
        lines.append(f"| {s['dataset']} | {tested_defender(s)} | {s['attack']} | {len(s['seeds'])} | {ms('clean_accuracy')} | "
                     f"{ms('poisoned_accuracy')} | {ms('accuracy_drop')} | " + (f"{ms(MEDIAN_DROP)} | " if medians else "")
                     + f"{ms('attack_seconds', 1.0)} |")
    return "\n".join(lines)


def defense_summary_table(summary):
    """A defense's results over seeds (metrics.summarize_defense) as a Markdown table: accuracies and drops in %
    (points), removals in points."""
    columns = [("defended acc. (%)", "defended_accuracy", 100.0), ("clean acc. with defense (%)", "clean_defended_accuracy", 100.0),
               ("drop from the clean acc. (points)", "defended_drop", 100.0),
               ("drop under the defense: from the clean acc. with defense (points)", "attack_drop_under_defense", 100.0),
               ("drop under it, medians of the last epochs", "attack_drop_under_defense_median_last_epochs", 100.0),
               ("poisons removed", "poisons_removed", 1.0), ("clean points removed", "clean_removed", 1.0),
               ("precision (%)", "precision", 100.0), ("recall (%)", "recall", 100.0)]
    columns = [c for c in columns if c[1] in summary]
    def ms(key, scale):
        std = summary[key]["std"]
        return mean_std_text(scale * summary[key]["mean"], None if std is None else scale * std,
                             digits=1 if scale == 1.0 else 2)
    return "\n".join([f"| defense | seeds | {' | '.join(c[0] for c in columns)} |",
                      "|---|---|" + "---|" * len(columns),
                      f"| {summary['defense']} | {len(summary['seeds'])} | {' | '.join(ms(k, sc) for _, k, sc in columns)} |"])


def defense_table(metrics):
    """One run under a defense (protocol.stage_defend) as a Markdown table."""
    # two drops of the defended model: from the clean accuracy (what the user keeps against no attack and no
    # defense), and from the clean accuracy with the defense (what the attack takes under it; the summaries' too)
    head = ("| clean acc. (%) | poisoned acc. (%) | defended acc. (%) | drop from the clean acc., undefended / defended "
            "(points) | clean acc. with defense (%) | drop under the defense: from the clean acc. with defense (points) |")
    row = (f"| {_pct(metrics['clean_accuracy'])} | {_pct(metrics['poisoned_accuracy'])} | {_pct(metrics['defended_accuracy'])} "
           f"| {_pct(metrics['accuracy_drop'])} / {_pct(metrics['defended_drop'])} | {_pct(metrics['clean_defended_accuracy'])} "
           f"| {_pct(metrics['attack_drop_under_defense'])} |")
    if metrics["kind"] == "filter":
        share = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        head += " removed: poisons / clean points | precision / recall |"
        row += (f" {metrics['poisons_removed']} of {metrics['n_poison']} / {metrics['clean_removed']} "
                f"| {share(metrics['precision'])} / {share(metrics['recall'])} |")
    if metrics.get("defender_validation"):
        head += " defender's validation set |"
        row += f" {metrics['defender_validation']} ({metrics['n_defender_validation']} points) |"
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1), row]) + _last_epochs_line(
        metrics, ("clean with defense", "clean_defended_accuracy_last_epochs"),
        ("defended", "defended_accuracy_last_epochs"), "attack_drop_under_defense")
