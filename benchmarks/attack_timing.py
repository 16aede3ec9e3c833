"""Per-batch time of a real TGDA attack, read from a run folder of `tgda-attack run` (issue 12, step 4).

    python benchmarks/attack_timing.py RUN_DIR [--json FILE] [--markdown FILE]

The attack's history holds the wall-clock seconds and the batches of every epoch. The first epoch
also pays for warm-up (and, with --cuda-graphs, for recording the solves), so the time per batch is
the median over the later epochs, projected to the paper's 12,060 MNIST batches (201 epochs of 60)
and set against summary.py's projection (f). The device is named in both files.
"""
import argparse
import json
import os
import platform
import statistics
import sys

import torch

PAPER_BATCHES = 12_060


def timing(run_dir):
    with open(os.path.join(run_dir, "attack.json")) as fh:
        attack = json.load(fh)
    with open(os.path.join(run_dir, "config.json")) as fh:
        config = json.load(fh)
    epochs = [h for h in attack["history"] if "seconds" in h]
    if not epochs:
        raise ValueError(f"{run_dir}/attack.json has no per-epoch seconds (written by an older version)")
    per_batch = [h["seconds"] / h["batches"] for h in epochs]
    steady = per_batch[1:] or per_batch
    median = statistics.median(steady)
    result = {
        "run": run_dir, "dataset": config["dataset"], "defender": config["defender"],
        "cuda_graphs": config.get("cuda_graphs"), "device": config["device"],
        "batches_per_epoch": epochs[0]["batches"], "epochs": len(epochs),
        "epoch_seconds": [h["seconds"] for h in epochs],
        "seconds_per_batch_after_first_epoch": median,
        "projected_minutes_for_paper_schedule": median * PAPER_BATCHES / 60,
        "attack_seconds": attack["attack_seconds"],
    }
    metrics_path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(metrics_path):
        with open(metrics_path) as fh:
            metrics = json.load(fh)
        result.update({k: metrics[k] for k in ("clean_accuracy", "poisoned_accuracy", "accuracy_drop") if k in metrics})
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    try:
        result = timing(args.run_dir)
    except (OSError, KeyError, ValueError) as exc:
        print(f"attack_timing: {exc}", file=sys.stderr)
        return 2
    result["device_name"] = (torch.cuda.get_device_name() if torch.cuda.is_available() and result["device"].startswith("cuda")
                             else platform.processor() or "CPU")
    text = (f"TGDA attack, {result['defender']} on {result['dataset']} ({result['batches_per_epoch']} batches an epoch, "
            f"{result['epochs']} epochs, cuda_graphs {result['cuda_graphs']}) on {result['device_name']}: "
            f"{1e3 * result['seconds_per_batch_after_first_epoch']:.1f} ms per batch after the first epoch "
            f"(epochs: {', '.join(f'{s:.2f}' for s in result['epoch_seconds'])} s), projected "
            f"{result['projected_minutes_for_paper_schedule']:.1f} min for the paper's {PAPER_BATCHES} batches")
    if "accuracy_drop" in result:
        text += (f"; accuracy {100 * result['clean_accuracy']:.2f} -> {100 * result['poisoned_accuracy']:.2f} "
                 f"(drop {100 * result['accuracy_drop']:.2f}, a shortened schedule)")
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(f"- {text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
