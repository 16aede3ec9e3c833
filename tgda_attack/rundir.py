"""A run's folder: the files each stage of the protocol writes, how they are written (JSON through a
temporary file and a rename, models and poisons as plain tensors read with weights_only=True), and
which settings wrote them.

config.json records the settings of the run that owns the folder. A run started into a folder that
holds another run is stopped before any work (`RunFolderError`): `overwrite` removes that run's files
and starts afresh; `resume` continues it, and only with the very same settings, so that no result is
ever reported under settings that did not produce it.
"""
import dataclasses
import json
import os

import torch

RUN_FILES = ("config.json", "pretrain.json", "defender_pretrained.pt", "attacker_pretrained.pt", "attack_checkpoint.pt",
             "attack_checkpoint.pt.tmp", "attack.json", "poisons.pt", "attacker_attacked.pt", "defender_attacked.pt",
             "defender_poisoned.pt", "metrics.json", "poisons.png")


class RunFolderError(ValueError):
    """The output folder holds a run that this one must not silently continue or overwrite."""


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def need(out, *names):
    missing = [n for n in names if not os.path.exists(os.path.join(out, n))]
    if missing:
        raise FileNotFoundError(f"{out} lacks {', '.join(missing)}: run the earlier stage(s) into this folder first "
                                "(tgda-attack pretrain / attack), or use tgda-attack run")


def load_state(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def settings_of(out):
    """The settings recorded in out/config.json (a dict without the data split's summary), or None."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return None
    values = read_json(path)
    values.pop("split", None)
    return values


def claim(out, cfg, *, overwrite=False, resume=False):
    """Makes `out` the folder of the run with settings `cfg` (resolved), or raises RunFolderError.

    A folder without config.json is claimed as it is. With another run's config.json: `overwrite`
    deletes that run's files, `resume` requires the same settings, neither stops with a message.
    Returns True when the folder already held this run (its finished stages can be skipped)."""
    if overwrite and resume:
        raise RunFolderError("--overwrite and --resume exclude each other: start afresh or continue, not both")
    os.makedirs(out, exist_ok=True)
    recorded = settings_of(out)
    if recorded is None:
        return False
    wanted = dataclasses.asdict(cfg)
    if overwrite:
        for name in RUN_FILES:
            path = os.path.join(out, name)
            if os.path.exists(path):
                os.remove(path)
        return False
    changed = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
    if resume and not changed:
        return True
    if resume:
        diff = ", ".join(f"{k} {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
        raise RunFolderError(f"{out} holds a run with other settings ({diff}); --resume continues only the same "
                             "settings: use another --out, or --overwrite to replace that run")
    raise RunFolderError(f"{out} already holds a run (config.json); --resume continues it with the same settings, "
                         "--overwrite replaces it, or choose another --out")
