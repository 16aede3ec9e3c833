"""The three-stage protocol of Lu, Kamath & Yu (TMLR 2022), Section 4.2, as functions and files.

  1. pretrain: the attacker learns to reconstruct D_tr (an autoencoder) and the defender is trained
     on D_tr and tested: acc1 (clean_accuracy);
  2. attack: the poisons D_p are generated (TGDA, Algorithm 1, or a baseline);
  3. evaluate: the defender is retrained from scratch on D_tr U D_p with exactly the pretrain
     procedure (same initialisation seed, epochs, batch size, learning rate) and tested: acc2
     (poisoned_accuracy); the accuracy drop is acc1 - acc2.

Each stage reads the previous stage's files from one output folder and writes its own, so the
stages can run separately (`tgda-attack pretrain|attack|evaluate`) or together (`run`). Model and
poison files are plain tensors that load with torch.load(weights_only=True).
"""
import dataclasses
import json
import logging
import os
import statistics
import time

import torch

from . import data as data_mod
from .attacks import LabelFlipAttack, TGDAAttack
from .models import ATTACKERS, make_attacker, make_defender
from .training import accuracy, pretrain_attacker, train_classifier

logger = logging.getLogger(__name__)

ATTACK_NAMES = ("tgda", "label-flip")

# Schedules by dataset (None in a Config means "take it from here").
# mnist / cifar10: the paper's Section 5.1 (alpha 0.01, 100 pretraining and 200 attack epochs).
# mnist-sample (2,800 training points, 1/15 of the paper's D_tr): the paper's epoch counts cannot be
# kept together with its batch of 1,000 (3 steps a pass: 300 pretraining steps underfit the NN
# defender). Batches of 100 give 28 steps a pass, close to the paper's 42, so the paper's 100
# pretraining epochs train the defenders to convergence (the NN reaches 100% training accuracy by
# epoch 60). The attack runs 20 epochs of 28 batches (560 leader steps, against the paper's 12,060)
# with the paper's alpha 0.01: a larger alpha (0.1 was tried) collapses the generator onto one
# saturated image for every poison. The follower's step beta is 0.05 instead of 0.1: with 0.1 the
# game's gradient descent diverged on the NN defender in 2 of 3 seeds (saturated poisons among 100
# points make its loss too sharp for that step). README, "Schedules", gives the measurements.
DATASET_DEFAULTS = {
    "mnist": {"pretrain_epochs": 100, "pretrain_batch_size": 1000, "attack_epochs": 200, "attack_batch_size": 1000,
              "attacker_epochs": 20, "attacker_batch_size": 1000, "alpha": 0.01, "beta": 0.1, "attacker": "mlp"},
    "cifar10": {"pretrain_epochs": 100, "pretrain_batch_size": 256, "attack_epochs": 200, "attack_batch_size": 256,
                "attacker_epochs": 20, "attacker_batch_size": 256, "alpha": 0.01, "beta": 0.1, "attacker": "autoencoder"},
    "mnist-sample": {"pretrain_epochs": 100, "pretrain_batch_size": 100, "attack_epochs": 20, "attack_batch_size": 100,
                     "attacker_epochs": 20, "attacker_batch_size": 100, "alpha": 0.01, "beta": 0.05, "attacker": "mlp"},
}
ATTACKER_NAMES = (*ATTACKERS, "pixels")  # "pixels": the poisons themselves are the leader's parameters


@dataclasses.dataclass
class Config:
    """Every setting of one protocol run; None values are filled from DATASET_DEFAULTS."""

    dataset: str = "mnist-sample"
    data_root: str = None
    download: bool = False
    defender: str = "lr"
    attack: str = "tgda"
    attacker: str = None
    epsilon: float = 0.03
    seed: int = 0
    split_seed: int = 0
    poison_init: str = "first"
    flip_rule: str = "reverse"
    pretrain_epochs: int = None
    pretrain_batch_size: int = None
    pretrain_lr: float = 0.1
    pretrain_attacker: bool = True
    attacker_epochs: int = None
    attacker_batch_size: int = None
    attack_epochs: int = None
    attack_batch_size: int = None
    alpha: float = None
    leader_steps: int = 1
    beta: float = None
    follower_steps: int = 20
    solver: str = "cgnr"
    solver_iterations: int = 16
    damping: float = 0.0
    cuda_graphs: bool = False
    warm_start: str = "partial"
    leader: str = "attacker"
    formulation: str = "non-zero-sum"
    dtype: str = "float32"
    device: str = "cpu"

    def resolved(self):
        """A copy with the dataset's defaults filled in and every choice checked."""
        if self.dataset not in data_mod.DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(data_mod.DATASETS)}")
        if self.attack not in ATTACK_NAMES:
            raise ValueError(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACK_NAMES)}")
        if self.attacker is not None and self.attacker not in ATTACKER_NAMES:
            raise ValueError(f"unknown attacker {self.attacker!r}; choose one of {', '.join(ATTACKER_NAMES)}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        filled = {k: v for k, v in DATASET_DEFAULTS[self.dataset].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


def _torch_dtype(cfg):
    return getattr(torch, cfg.dtype)


def load_splits(cfg):
    splits = data_mod.load_dataset(cfg.dataset, cfg.data_root, cfg.download, seed=cfg.split_seed)
    dt = _torch_dtype(cfg)
    for name in ("x_train", "x_val", "x_test"):
        setattr(splits, name, getattr(splits, name).to(cfg.device, dt))
    for name in ("y_train", "y_val", "y_test"):
        setattr(splits, name, getattr(splits, name).to(cfg.device))
    return splits


def new_defender(cfg, image_shape):
    """The defender at its seeded initialisation: the same for pretraining and retraining."""
    torch.manual_seed(cfg.seed)
    return make_defender(cfg.defender, image_shape).to(cfg.device, _torch_dtype(cfg))


def new_attacker(cfg, image_shape):
    """The attacker network at its seeded initialisation, or None for the "pixels" attacker."""
    if cfg.attacker == "pixels":
        return None
    torch.manual_seed(cfg.seed + 1)
    return make_attacker(cfg.attacker, image_shape).to(cfg.device, _torch_dtype(cfg))


def train_defender(cfg, x, y, verbose=False, desc="train defender"):
    """The pretrain procedure: a fresh defender trained on (x, y). Retraining calls it again."""
    model = new_defender(cfg, tuple(x.shape[1:]))
    return train_classifier(model, x, y, epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch_size,
                            lr=cfg.pretrain_lr, seed=cfg.seed, verbose=verbose, desc=desc)


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def _read_json(path):
    with open(path) as fh:
        return json.load(fh)


def _need(out, *names):
    missing = [n for n in names if not os.path.exists(os.path.join(out, n))]
    if missing:
        raise FileNotFoundError(f"{out} lacks {', '.join(missing)}: run the earlier stage(s) into this folder first "
                                "(tgda-attack pretrain / attack), or use tgda-attack run")


def _load_state(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def stage_pretrain(cfg, out, verbose=False):
    """Stage 1: writes config.json, the pretrained models and pretrain.json (clean accuracy)."""
    cfg = cfg.resolved()
    os.makedirs(out, exist_ok=True)
    splits = load_splits(cfg)
    _write_json(os.path.join(out, "config.json"), {**dataclasses.asdict(cfg), "split": splits.summary()})
    start = time.perf_counter()
    defender = train_defender(cfg, splits.x_train, splits.y_train, verbose, desc="pretrain defender")
    clean = accuracy(defender, splits.x_test, splits.y_test)
    torch.save(defender.state_dict(), os.path.join(out, "defender_pretrained.pt"))
    attacker = new_attacker(cfg, splits.image_shape) if cfg.attack == "tgda" else None
    if attacker is not None:
        if cfg.pretrain_attacker:
            pretrain_attacker(attacker, splits.x_train, splits.y_train, epochs=cfg.attacker_epochs,
                              batch_size=cfg.attacker_batch_size, seed=cfg.seed, verbose=verbose)
        torch.save(attacker.state_dict(), os.path.join(out, "attacker_pretrained.pt"))
    result = {"clean_accuracy": clean, "pretrain_seconds": time.perf_counter() - start}
    _write_json(os.path.join(out, "pretrain.json"), result)
    return result


def _config_from(out):
    _need(out, "config.json")
    values = _read_json(os.path.join(out, "config.json"))
    values.pop("split", None)
    return Config.from_dict(values)


def stage_attack(out, verbose=False):
    """Stage 2: reads the pretrained models, writes poisons.pt, the attacked models and attack.json."""
    _need(out, "config.json", "defender_pretrained.pt")
    cfg = _config_from(out)
    splits = load_splits(cfg)
    defender = new_defender(cfg, splits.image_shape)
    defender.load_state_dict(_load_state(os.path.join(out, "defender_pretrained.pt")))
    start = time.perf_counter()
    if cfg.attack == "label-flip":
        attack = LabelFlipAttack(cfg.epsilon, rule=cfg.flip_rule, init=cfg.poison_init, seed=cfg.seed)
        x_p, y_p = attack.poison(splits.x_train, splits.y_train)
        history = []
    else:
        attacker = new_attacker(cfg, splits.image_shape)
        if attacker is not None:
            _need(out, "attacker_pretrained.pt")
            attacker.load_state_dict(_load_state(os.path.join(out, "attacker_pretrained.pt")))
        attack = TGDAAttack(defender, attacker, cfg.epsilon, epochs=cfg.attack_epochs,
                            batch_size=cfg.attack_batch_size, alpha=cfg.alpha, leader_steps=cfg.leader_steps,
                            beta=cfg.beta, follower_steps=cfg.follower_steps, solver=cfg.solver,
                            solver_iterations=cfg.solver_iterations, damping=cfg.damping, cuda_graphs=cfg.cuda_graphs,
                            warm_start=cfg.warm_start,
                            leader=cfg.leader, formulation=cfg.formulation, init=cfg.poison_init, seed=cfg.seed,
                            checkpoint=os.path.join(out, "attack_checkpoint.pt"), verbose=verbose)
        x_p, y_p = attack.poison(splits.x_train, splits.y_train, splits.x_val, splits.y_val)
        history = attack.history
        if attack.attacker_ is not None:
            torch.save(attack.attacker_.state_dict(), os.path.join(out, "attacker_attacked.pt"))
        torch.save(attack.defender_.state_dict(), os.path.join(out, "defender_attacked.pt"))
    seconds = time.perf_counter() - start
    torch.save({"x_poison": x_p.cpu(), "y_poison": y_p.cpu(), "source_indices": attack.source_indices_},
               os.path.join(out, "poisons.pt"))
    result = {"attack_seconds": seconds, "n_poison": len(y_p), "history": history}
    _write_json(os.path.join(out, "attack.json"), result)
    return result


def stage_evaluate(out, verbose=False):
    """Stage 3: retrains the defender from scratch on D_tr U D_p; writes metrics.json and the PNG."""
    _need(out, "config.json", "pretrain.json", "attack.json", "poisons.pt")
    cfg = _config_from(out)
    splits = load_splits(cfg)
    poisons = _load_state(os.path.join(out, "poisons.pt"))
    x_p = poisons["x_poison"].to(cfg.device, _torch_dtype(cfg))
    y_p = poisons["y_poison"].to(cfg.device)
    retrained = train_defender(cfg, torch.cat([splits.x_train, x_p]), torch.cat([splits.y_train, y_p]),
                               verbose, desc="retrain defender")
    torch.save(retrained.state_dict(), os.path.join(out, "defender_poisoned.pt"))
    pre, att = _read_json(os.path.join(out, "pretrain.json")), _read_json(os.path.join(out, "attack.json"))
    poisoned = accuracy(retrained, splits.x_test, splits.y_test)
    metrics = {
        "dataset": cfg.dataset, "defender": cfg.defender, "attack": cfg.attack, "epsilon": cfg.epsilon,
        "seed": cfg.seed, "n_train": len(splits.y_train), "n_val": len(splits.y_val), "n_test": len(splits.y_test),
        "n_poison": len(y_p), "clean_accuracy": pre["clean_accuracy"], "poisoned_accuracy": poisoned,
        "accuracy_drop": pre["clean_accuracy"] - poisoned, "attack_seconds": att["attack_seconds"],
        "pretrain_seconds": pre["pretrain_seconds"],
    }
    source = splits.x_train[poisons["source_indices"].to(splits.x_train.device)]
    metrics.update(poison_statistics(source.cpu(), poisons["x_poison"]))
    _write_json(os.path.join(out, "metrics.json"), metrics)
    from .report import save_poison_figure
    save_poison_figure(source.cpu(), poisons["x_poison"], splits.y_train[poisons["source_indices"]].cpu(),
                       poisons["y_poison"], os.path.join(out, "poisons.png"))
    return metrics


def poison_statistics(x_source, x_poison):
    """How far the poisons moved from their clean sources and how diverse they are (mean L2 distances
    over flattened images). A poison_pairwise_l2 far below source_pairwise_l2 means the attacker has
    collapsed many poisons onto one image."""
    src, poi = x_source.flatten(1).double(), x_poison.flatten(1).double()
    n = len(poi)

    def mean_pairwise(x):
        return (torch.cdist(x, x).sum() / (n * (n - 1))).item() if n > 1 else 0.0

    return {"mean_perturbation_l2": (poi - src).norm(dim=1).mean().item(),
            "poison_pairwise_l2": mean_pairwise(poi), "source_pairwise_l2": mean_pairwise(src)}


def run(cfg, out, verbose=False):
    """All three stages into `out`; returns the metrics."""
    stage_pretrain(cfg, out, verbose)
    stage_attack(out, verbose)
    return stage_evaluate(out, verbose)


def summarize(runs):
    """Mean and standard deviation over seeds of the metrics of several runs."""
    keys = ("clean_accuracy", "poisoned_accuracy", "accuracy_drop", "attack_seconds")
    keys += tuple(k for k in ("mean_perturbation_l2", "poison_pairwise_l2", "source_pairwise_l2") if all(k in r for r in runs))
    summary = {"seeds": [r["seed"] for r in runs], **{k: runs[0][k] for k in ("dataset", "defender", "attack", "epsilon")}}
    for k in keys:
        values = [r[k] for r in runs]
        summary[k] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return summary
