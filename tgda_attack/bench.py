"""`tgda-attack bench`: the experiments behind the tables of Lu, Kamath & Yu, "Indiscriminate Data Poisoning
Attacks on Neural Networks" (TMLR 2022), run with this library's protocol, with the paper's published
numbers beside ours.

Tables 2-9, 12 and 13 and Figure 4 (accuracy drop against epsilon), and the defenses of Tables 10 and 11
(every attack against every defense of tgda_attack.defenses). A table is a grid of cells; a cell is a set
of run settings (a tgda_attack.config.Config over the scale's base) run for every seed into its own
folder OUT/table_N/ROW/COLUMN/seed_K; a cell of a defense table (10, 11) is Table 2's run of its attack and
defender tested under a defense, in Table 2's folder (the attack runs once for Table 2 and every defense),
into its sub-folder defense_NAME, and a cell with the settings of a Table 2 run is that run, in its folder.
A run already complete in its folder is kept (the run folders' resume check: tgda_attack.rundir.claim), so
an interrupted bench continues where it stopped; a run whose folder holds other settings stops the bench
unless --overwrite.

Rows beyond the paper's: min-max and i-min-max in their sanitisation feasible set (the paper's, the row under
the attack's name) and in the pixel box alone ("(box)"), and min-max in both with a follower of 1,000 steps a round
("(long follower)", "(box, long follower)"; the default is 20); Gradient Canceling with labels chosen to cancel D_tr's
gradient ("(cancel labels)") and as its authors' code runs it ("(authors)": their recipe and their network of the
column's kind, gc-lr / gc-nn / gc-cnn, beside the drops of their paper, Lu, Kamath & Yu, ICML 2023, Table 2); label
flip with points of the attacker's D_v labelled with the wrong class the trained defender finds most probable, of
every class ("(nearest, D_v)") or of the fewest confused class pairs that hold the budget ("(confused pairs, D_v)").

Scales: "smoke" (the embedded mnist-sample with every schedule cut to a run of seconds: for tests and CI,
numbers without meaning), "sample" (mnist-sample with its dataset defaults: minutes a run on 2 CPU
cores), "paper" (the full datasets with the paper's settings, from --data-root). The paper's CIFAR-10
tables (3, 12, 13) run on MNIST at the smoke and sample scales, without the paper's numbers beside.

Each table is written as Markdown (mean +- std over seeds of the accuracy drop in points, the poisoned
accuracy and the attack time), CSV and JSON; Figure 4 also as a PNG.
"""
import csv
import dataclasses
import os
import re

from .progress import progress_bar

from . import cluster, protocol
from .attacks import ATTACKS
from .config import EXECUTION, Config, DefenseConfig
from .data import check_readable
from .defenses import DEFENSES
from .metrics import mean_std
from .report import mean_std_text as _fmt
from .rundir import OtherSettingsError, RunFolderError, exclusive, read_json, write_json

SCALES = ("smoke", "sample", "paper")
SMOKE = {"pretrain_epochs": 3, "pretrain_batch_size": 100, "attacker_epochs": 0, "attack_epochs": 1,
         "attack_batch_size": 1000, "follower_steps": 1, "solver_iterations": 2}
MNIST_DEFENDERS = {"smoke": ("lr",), "sample": ("lr", "nn"), "paper": ("lr", "nn", "cnn")}
CIFAR_DEFENDERS = ("cifar-cnn", "resnet18")
FIGURE_EPSILONS = (0.03, 0.1, 0.3, 1.0)
FIGURE_ATTACKS = ("label-flip", "min-max", "gradient-canceling", "tgda")


@dataclasses.dataclass(frozen=True)
class Paper:
    """A published cell: the poisoned accuracy and the drop (points), the attack's hours where given, and the
    paper it is from where that is not the TMLR paper (whose clean accuracies are then not beside it)."""

    accuracy: float
    drop: float
    hours: float = None
    source: str = None


@dataclasses.dataclass(frozen=True)
class PaperDefense:
    """A published cell of Tables 10-11: the drop (points) without and with the defense."""

    drop: float
    defended_drop: float


@dataclasses.dataclass(frozen=True)
class Cell:
    row: str
    column: str
    settings: dict
    defense: str = None  # a defense table's cell: the run of `settings` tested under this defense
    folder: str = None  # the row's folder name where it is not the row's own (min-max's sanitised rows)

    @property
    def row_folder(self):
        return self.folder or _slug(self.row)

    @property
    def key(self):
        return (self.row, self.column) if self.defense is None else (self.row, self.column, self.defense)


@dataclasses.dataclass(frozen=True)
class Table:
    key: str  # "2" ... "13", "figure-4"
    title: str
    cifar: bool  # the paper ran it on CIFAR-10
    cells: object  # (defenders, attacks, defenses) -> [Cell]
    paper: dict  # Cell.key -> Paper (PaperDefense for a defense table)
    paper_clean: dict  # column -> clean accuracy (%)
    row_name: str = "attack"
    attacks: tuple = None  # the attacks (rows) when --attacks is not given; None: every registered attack
    defenses: tuple = ()  # a defense table's defenses when --defenses is not given; () for the other tables


MNIST_CLEAN = {"lr": 92.35, "nn": 98.04, "cnn": 99.13}
CIFAR_CLEAN = {"cifar-cnn": 69.44, "resnet18": 94.95}


# The paper's min-max and improved min-max are Koh et al.'s, whose poisons stay in a sanitisation feasible set:
# those rows run in it (and carry the paper's numbers); a second row each runs in the pixel box alone.
SANITIZED_ROWS = ("min-max", "i-min-max")

# Min-max with its follower LONG_FOLLOWER times the other rows' follower_steps a round (1,000 at the paper's 20), in
# both feasible sets: the follower's length decides min-max's strength (attacks/min_max.py; on full-MNIST LR, box,
# 1,000 steps drop 14.71 +- 2.98 over 15 retrainings against 9.04 +- 2.51 with 20). A multiple, so that a
# `--set follower_steps=N` (a shortened schedule) shortens these rows too, and the smoke scale stays seconds.
LONG_FOLLOWER = 50
LONG_FOLLOWER_ROWS = ("min-max",)
FOLLOWER_FACTOR = "follower_steps_factor"  # a cell setting that plan() turns into follower_steps


def _gc_as_authors(defender):
    """Gradient Canceling as watml/plim runs it (attacks/gradient_canceling.py, `recipe`), against their network
    of the column's kind (gc-lr, gc-nn, gc-cnn) with their evaluation: float64, batches of 10,000 (CNN: 1,000), plain
    SGD (no gradient-norm bound)."""
    return {"gc_recipe": "authors", "defender": f"gc-{defender}", "dtype": "float64",
            "pretrain_batch_size": 1000 if defender == "cnn" else 10000, "pretrain_max_grad_norm": 0.0}


# Gradient Canceling's rows beyond its default (valid pixels, true labels): {row: (folder, settings by defender)}.
GC_AUTHORS_ROW = "gradient-canceling (authors)"
GC_ROWS = {"gradient-canceling (cancel labels)": ("gradient-canceling_cancel", lambda d: {"gc_labels": "cancel"}),
           GC_AUTHORS_ROW: ("gradient-canceling_authors", _gc_as_authors)}


# Label flip beyond the paper's (copies of D_tr[0:eps N], labels 9 - y): the attacker's own D_v points, each labelled
# with the wrong class the trained defender finds most probable, of every class or of the fewest confused class pairs
# that hold the budget, or the points and labels whose gradient step raises the loss on D_v most to first order
# (attacks/label_flip.py). {row: (folder, settings)}
LABEL_FLIP_ROWS = {
    "label-flip (nearest, D_v)": ("label-flip_nearest_val", {"flip_rule": "nearest", "flip_pool": "val"}),
    "label-flip (confused pairs, D_v)": ("label-flip_pairs_val", {"flip_rule": "nearest", "flip_pool": "val",
                                                                  "flip_select": "confused-pairs"}),
    "label-flip (influence, D_v)": ("label-flip_influence_val", {"flip_rule": "influence", "flip_pool": "val",
                                                                 "flip_select": "influence"}),
}


def _rows(attack, defender):
    """[(row name, settings, folder name)] of an attack against a defender in Tables 2 and 10. The box rows keep
    the attack's own folder, which held box runs before the sanitised rows existed, so that those runs are kept."""
    own = {"attack": attack, "defender": defender}
    if attack in SANITIZED_ROWS:
        rows = [(attack, {**own, "feasible_set": "sanitized"}, f"{attack}_sanitized"),
                (f"{attack} (box)", {**own, "feasible_set": "box"}, attack)]
        if attack in LONG_FOLLOWER_ROWS:
            long = {FOLLOWER_FACTOR: LONG_FOLLOWER}
            rows += [(f"{attack} (long follower)", {**own, "feasible_set": "sanitized", **long},
                      f"{attack}_sanitized_long"),
                     (f"{attack} (box, long follower)", {**own, "feasible_set": "box", **long}, f"{attack}_long")]
        return rows
    if attack == "gradient-canceling":
        return [(attack, own, None)] + [(row, {**own, **settings(defender)}, folder)
                                        for row, (folder, settings) in GC_ROWS.items()]
    if attack == "label-flip":
        return [(attack, own, None)] + [(row, {**own, **settings}, folder)
                                        for row, (folder, settings) in LABEL_FLIP_ROWS.items()]
    return [(attack, own, None)]


def _by_row(cells):
    """The cells in the order of their rows' first appearance (a row's defenders together, as in the paper)."""
    order = {}
    for cell in cells:
        order.setdefault(cell.row, len(order))
    return sorted(cells, key=lambda cell: order[cell.row])


def _attack_rows(defenders, attacks, defenses=()):
    return _by_row([Cell(row, d, settings, folder=folder) for a in attacks for d in defenders
                    for row, settings, folder in _rows(a, d)])


def _variant_rows(variants):
    """Rows: defenders; columns: TGDA variants {label: settings}."""
    return lambda defenders, attacks, defenses: [Cell(d, label, {"attack": "tgda", "defender": d, **settings})
                                       for d in defenders for label, settings in variants.items()]


def _transfer(defenders, attacks, defenses):
    return [Cell(s, t, {"attack": "tgda", "defender": s, "eval_defender": t}) for s in defenders for t in defenders]


def _unlearnable(defenders, attacks, defenses):
    return [Cell("emn", f"{round(100 * p)}%", {"attack": "emn", "emn_mode": "unlearnable", "epsilon": p,
                                                "defender": defenders[-1]})
            for p in (0.2, 0.4, 0.6, 0.8, 1.0)]


def _figure(defenders, attacks, defenses):
    """Figure 4's points; min-max and i-min-max in the pixel box (their default), so named as Table 2's box rows."""
    return [Cell(f"{a} (box)" if a in SANITIZED_ROWS else a, f"{d} eps={e}", {"attack": a, "defender": d, "epsilon": e},
                 folder=_slug(a))
            for d in defenders for a in attacks for e in FIGURE_EPSILONS]


def _defended(defenders, attacks, defenses):
    return _by_row([Cell(row, d, settings, defense, folder) for a in attacks for d in defenders
                    for row, settings, folder in _rows(a, d) for defense in defenses])


def _p(acc, drop, hours=None):
    return Paper(acc, drop, hours)


# Lu, Kamath & Yu (ICML 2023), "Exploring the limits of model-targeted indiscriminate data poisoning attacks",
# Table 2, MNIST, epsilon 0.03, Gradient Canceling's drops against their LR, NN (784-128-10) and CNN.
GC_PAPER_DROPS = {"lr": 21.1, "nn": 5.3, "cnn": 12.8}

CIFAR_LABEL_FLIP_AND_TGDA = {  # Tables 3 and 12 share these rows
    ("label-flip", "cifar-cnn"): _p(68.99, 0.45, 0), ("label-flip", "resnet18"): _p(94.79, 0.16, 0),
    ("tgda", "cifar-cnn"): _p(65.15, 4.29, 42), ("tgda", "resnet18"): _p(89.41, 5.54, 162),
}

TGDA_UNDER_DEFENSES = {  # the paper's Table 11: drop without / with the defense
    ("tgda", d, defense): PaperDefense(drop, with_) for d, drop, row in (
        ("lr", 2.79, (2.45, 2.13, 2.77)), ("nn", 1.50, (1.48, 1.32, 1.50)), ("cnn", 1.11, (1.10, 0.98, 1.11)))
    for defense, with_ in zip(("influence", "sever", "maxup"), row)}

TABLES = {t.key: t for t in (
    Table("2", "MNIST, epsilon = 3%: every attack against every defender", False, _attack_rows, {
        ("label-flip", "lr"): _p(90.83, 1.52, 0), ("label-flip", "nn"): _p(97.99, 0.05, 0),
        ("label-flip", "cnn"): _p(99.12, 0.01, 0),
        ("min-max", "lr"): _p(89.80, 2.55, 0.7), ("min-max", "nn"): _p(98.07, -0.03, 13), ("min-max", "cnn"): _p(99.55, -0.42, 63),
        ("i-min-max", "lr"): _p(89.56, 2.79, 19), ("i-min-max", "nn"): _p(97.82, 0.22, 73),
        ("i-min-max", "cnn"): _p(99.05, 0.06, 246),
        ("back-gradient", "lr"): _p(89.82, 2.53, 27), ("back-gradient", "nn"): _p(97.67, 0.37, 239),
        ("back-gradient", "cnn"): _p(99.02, 0.09, 2153),
        ("tgda", "lr"): _p(89.56, 2.79, 1.1), ("tgda", "nn"): _p(96.54, 1.50, 15), ("tgda", "cnn"): _p(98.02, 1.11, 75),
        **{(GC_AUTHORS_ROW, d): Paper(None, drop, source="GC paper") for d, drop in GC_PAPER_DROPS.items()},
    }, MNIST_CLEAN),
    Table("3", "CIFAR-10, epsilon = 3%: label flip, MetaPoison and TGDA", True,
          lambda defenders, attacks, defenses: _attack_rows(defenders, _among(("label-flip", "metapoison", "tgda"), attacks)), {
              **CIFAR_LABEL_FLIP_AND_TGDA,
              ("metapoison", "cifar-cnn"): _p(68.14, 1.13, 35), ("metapoison", "resnet18"): _p(92.90, 2.05, 108),
          }, CIFAR_CLEAN),
    Table("4", "TGDA: attacker or defender as the leader", False,
          _variant_rows({"attacker leads": {"leader": "attacker"}, "defender leads": {"leader": "defender"}}), {
              ("lr", "attacker leads"): _p(89.56, 2.79), ("lr", "defender leads"): _p(89.79, 2.56),
              ("nn", "attacker leads"): _p(96.54, 1.50), ("nn", "defender leads"): _p(96.98, 1.06),
              ("cnn", "attacker leads"): _p(98.02, 1.11), ("cnn", "defender leads"): _p(98.66, 0.47),
          }, MNIST_CLEAN, "defender"),
    Table("5", "TGDA: non-zero-sum or zero-sum game", False,
          _variant_rows({"non-zero-sum": {"formulation": "non-zero-sum"}, "zero-sum": {"formulation": "zero-sum"}}), {
              ("lr", "non-zero-sum"): _p(89.56, 2.79), ("lr", "zero-sum"): _p(92.33, 0.02),
              ("nn", "non-zero-sum"): _p(96.54, 1.50), ("nn", "zero-sum"): _p(98.07, -0.03),
              ("cnn", "non-zero-sum"): _p(98.02, 1.11), ("cnn", "zero-sum"): _p(99.55, -0.42),
          }, MNIST_CLEAN, "defender"),
    Table("6", "TGDA: with or without pretraining the attacker", False,
          _variant_rows({"with pretrain": {"pretrain_attacker": True}, "without pretrain": {"pretrain_attacker": False}}), {
              ("lr", "with pretrain"): _p(89.56, 2.79), ("lr", "without pretrain"): _p(92.09, 0.26),
              ("nn", "with pretrain"): _p(96.54, 1.50), ("nn", "without pretrain"): _p(97.47, 0.57),
              ("cnn", "with pretrain"): _p(98.02, 1.11), ("cnn", "without pretrain"): _p(98.72, 0.41),
          }, MNIST_CLEAN, "defender"),
    Table("7", "TGDA: m leader and n follower steps a batch", False,
          _variant_rows({f"m={m}, n={n}": {"leader_steps": m, "follower_steps": n}
                         for m, n in ((1, 0), (1, 1), (1, 20), (20, 1), (20, 20))}), {
              **{("lr", f"m={m}, n={n}"): _p(92.35 - d, d) for (m, n), d in
                 {(1, 0): 0.05, (1, 1): 2.38, (1, 20): 2.79, (20, 1): 3.06, (20, 20): 2.57}.items()},
              **{("nn", f"m={m}, n={n}"): _p(98.04 - d, d) for (m, n), d in
                 {(1, 0): 0.02, (1, 1): 1.01, (1, 20): 1.50, (20, 1): 1.71, (20, 20): 1.19}.items()},
          }, MNIST_CLEAN, "defender"),
    Table("8", "TGDA: partial warm start or cold start", False,
          _variant_rows({"partial warm start": {"warm_start": "partial"}, "cold start": {"warm_start": "cold"}}), {
              ("lr", "partial warm start"): _p(89.56, 2.79), ("lr", "cold start"): _p(89.84, 2.41),
              ("nn", "partial warm start"): _p(96.54, 1.50), ("nn", "cold start"): _p(96.77, 1.27),
              ("cnn", "partial warm start"): _p(98.02, 1.11), ("cnn", "cold start"): _p(98.33, 0.80),
          }, MNIST_CLEAN, "defender"),
    Table("9", "TGDA transfer: poisons made against a surrogate (row), tested on a target (column)", False, _transfer, {
        ("lr", "lr"): _p(None, 2.79), ("lr", "nn"): _p(None, 0.12), ("lr", "cnn"): _p(None, 0.27),
        ("nn", "lr"): _p(None, 0.13), ("nn", "nn"): _p(None, 1.50), ("nn", "cnn"): _p(None, 0.62),
        ("cnn", "lr"): _p(None, 3.22), ("cnn", "nn"): _p(None, 1.47), ("cnn", "cnn"): _p(None, 1.11),
    }, MNIST_CLEAN, "surrogate"),
    Table("10", "MNIST, epsilon = 3%: every attack against every defense (the paper: TGDA against the loss "
          "defense, and Table 11's)", False, _defended, {**TGDA_UNDER_DEFENSES, **{
              ("tgda", d, "loss"): PaperDefense(drop, with_) for d, (drop, with_) in
              {"lr": (2.79, 2.56), "nn": (1.50, 1.49), "cnn": (1.11, 1.104)}.items()}},
          MNIST_CLEAN, defenses=tuple(DEFENSES)),  # every registered attack (--attacks for fewer)
    Table("11", "MNIST, epsilon = 3%: TGDA against the influence, Sever and MaxUp defenses", False,
          lambda defenders, attacks, defenses: _defended(defenders, ("tgda",), defenses), TGDA_UNDER_DEFENSES,
          MNIST_CLEAN, attacks=("tgda",), defenses=("influence", "sever", "maxup")),
    Table("12", "CIFAR-10, epsilon = 3%: error-minimising noise against label flip and TGDA", True,
          lambda defenders, attacks, defenses: _attack_rows(defenders, _among(("label-flip", "emn", "tgda"), attacks)), {
              **CIFAR_LABEL_FLIP_AND_TGDA,
              ("emn", "cifar-cnn"): _p(69.00, 0.44, 2.2), ("emn", "resnet18"): _p(94.76, 0.19, 8.4),
          }, CIFAR_CLEAN),
    Table("13", "Unlearnable examples: a fraction of the training set perturbed in place (accuracy, %)", True,
          _unlearnable, {("emn", f"{p}%"): _p(a, 94.95 - a) for p, a in
                         ((20, 94.38), (40, 93.10), (60, 91.90), (80, 86.85), (100, 19.93))},
          {f"{p}%": 94.95 for p in (20, 40, 60, 80, 100)}),
    Table("figure-4", "Accuracy drop against epsilon (the paper's Figure 4, which gives no numbers)", False, _figure,
          {}, MNIST_CLEAN, attacks=FIGURE_ATTACKS),
)}


def base_settings(table, scale, data_root=None, device="cpu"):
    """The Config values every cell of `table` starts from at `scale`."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    if scale != "paper":
        return {"dataset": "mnist-sample", "device": device, **(SMOKE if scale == "smoke" else {})}
    if not data_root:
        raise ValueError("the paper scale reads the full dataset: pass --data-root DIR "
                         "(for MNIST: ../shared/data/fetch-mnist.sh DIR lays it out)")
    return {"dataset": "cifar10" if table.cifar else "mnist", "data_root": data_root, "device": device}


def default_defenders(table, scale):
    return CIFAR_DEFENDERS if table.cifar and scale == "paper" else MNIST_DEFENDERS[scale]


def defense_config(cell, scale):
    """The DefenseConfig of a defense table's cell (its quick settings at the smoke scale), or None."""
    if cell.defense is None:
        return None
    quick = DEFENSES[cell.defense].quick if scale == "smoke" else {}
    return DefenseConfig(defense=cell.defense, **quick).checked()


def overrides_text(overrides):
    """`--set` settings as the tables state them: "attack_epochs=2, alpha=0.05" ("" for none)."""
    return ", ".join(f"{k}={v}" for k, v in (overrides or {}).items())


def check_overrides(table, overrides, defenders, attacks, defenses):
    """ValueError for a `--set` setting the bench sets itself: the seed, the scale's dataset and device, or a
    setting the table's cells vary (a column of Table 7 is its leader_steps and follower_steps)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    cells = table.cells(defenders, attacks, defenses)
    for key in overrides:
        if key not in fields:
            raise ValueError(f"--set {key}=...: no such setting of a run (`tgda-attack run --help` lists them; "
                             "a defense's own settings are not set here)")
        if key in BENCH_OWNED:
            raise ValueError(f"--set {key}=...: {BENCH_OWNED[key]}")
        varied = sorted({c.column for c in cells if key in c.settings})
        if varied:
            raise ValueError(f"--set {key}=...: table {table.key} sets {key} itself in its cells "
                             f"({'; '.join(varied[:3])}{'; ...' if len(varied) > 3 else ''})")


BENCH_OWNED = {"seed": "the bench runs seeds 0 .. K-1: use --seeds K",
               "dataset": "the table and --scale choose the dataset", "data_root": "use --data-root",
               "device": "use --device", "defender": "use --defenders"}


def plan(table, scale, seeds, *, data_root=None, device="cpu", defenders=None, attacks=None, defenses=None,
         overrides=None, rows=None):
    """[(cell, seed, resolved Config)] of a table at a scale, every setting checked before anything runs.
    `overrides` ({setting: value}, `--set`) replace the scale's settings in every cell (a shortened schedule);
    `rows` (row folder names, `--rows`) keeps only those rows of the chosen attacks."""
    # a name given twice is one column / row (its runs counted twice made "seeds 2" of one run, with a std of 0)
    defenders, attacks, defenses = (tuple(dict.fromkeys(names)) if names else names
                                    for names in (defenders, attacks, defenses))
    chosen_attacks = attacks
    defenders = tuple(defenders or default_defenders(table, scale))
    dataset = "CIFAR-10" if table.cifar and scale == "paper" else "MNIST"
    allowed = CIFAR_DEFENDERS if dataset == "CIFAR-10" else MNIST_DEFENDERS["paper"]
    wrong = [d for d in defenders if d not in allowed]
    if wrong:
        raise ValueError(f"table {table.key} at the {scale} scale runs on {dataset}: defender(s) {', '.join(wrong)} "
                         f"are for another dataset; choose from {', '.join(allowed)}")
    attacks = tuple(attacks or table.attacks or ATTACKS)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    if defenses and not table.defenses:
        raise ValueError(f"table {table.key} tests no defense; --defenses is for the defense tables "
                         f"({', '.join(t.key for t in TABLES.values() if t.defenses)})")
    defenses = tuple(defenses or table.defenses)
    unknown = [d for d in defenses if d not in DEFENSES]
    if unknown:
        raise ValueError(f"unknown defense(s) {', '.join(unknown)}; choose from {', '.join(DEFENSES)}")
    overrides = dict(overrides or {})
    check_overrides(table, overrides, defenders, attacks, defenses)
    base = base_settings(table, scale, data_root, device)
    runs = []
    cells = table.cells(defenders, attacks, defenses)
    if overrides.get("perfect_knowledge"):  # the rows whose poisons are D_v's points would take them from D_test
        cells = [cell for cell in cells if cell.settings.get("flip_pool") != "val"]
    ignored = [a for a in chosen_attacks or () if a not in {cell.settings["attack"] for cell in cells}]
    if ignored:  # tables 4-9, 11 and 13 run the attack they study, whatever --attacks says
        ran = sorted({cell.settings["attack"] for cell in table.cells(defenders, table.attacks or tuple(ATTACKS),
                                                                       defenses)})
        raise ValueError(f"table {table.key} studies {', '.join(ran)}, not {', '.join(ignored)}: drop those from "
                         "--attacks (it chooses among the rows of tables " + ", ".join(
                             t.key for t in TABLES.values() if _chooses_attacks(t)) + ")")
    if rows:
        folders = list(dict.fromkeys(cell.row_folder for cell in cells))
        unknown = [r for r in rows if r not in folders]
        if unknown:
            raise ValueError(f"--rows: table {table.key} has no row {', '.join(unknown)} among the chosen attacks' "
                             f"rows; choose from {', '.join(folders)}")
        cells = [cell for cell in cells if cell.row_folder in rows]
    for cell in cells:
        quick = ATTACKS[cell.settings["attack"]].quick if scale == "smoke" else {}
        where = f"table {table.key}, {' / '.join(cell.key)}"
        try:
            defense_config(cell, scale)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        settings = dict(cell.settings)
        factor = settings.pop(FOLLOWER_FACTOR, None)
        for seed in seeds:
            try:
                values = {**base, **quick, **overrides, **settings, "seed": seed}
                cfg = Config.from_dict(values).resolved()
                if factor is not None:
                    cfg = Config.from_dict({**values, "follower_steps": factor * cfg.follower_steps}).resolved()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: {exc}") from None
            runs.append((cell, seed, cfg))
    return runs


def _among(studied, chosen):
    """The attacks of a table that studies `studied`, in its order, kept to those --attacks chose (all without)."""
    return tuple(a for a in studied if chosen is None or a in chosen)


def _chooses_attacks(table):
    """Whether --attacks chooses `table`'s rows (it does not where the table studies one attack's variants)."""
    defenders = default_defenders(table, "smoke")[:1]
    return len({c.settings["attack"] for c in table.cells(defenders, tuple(ATTACKS), table.defenses)}) > 1


def _slug(text):
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def run_folder(out, table, cell, seed, table_2_row=None):
    """OUT/table_N/ROW/COLUMN/seed_K. A defense table's cell is Table 2's run of its row and defender tested
    under a defense, and a cell whose settings are those of a Table 2 run (`table_2_row`, that run's row folder:
    the ablations' default column, such as Table 4's "attacker leads" or Figure 4's epsilon 3%; which one
    depends on the scale's settings) is that run: their folder is Table 2's, so that a run Table 2 has made is
    not made again."""
    if cell.defense is not None:  # a defense table's columns are Table 2's (its defenders)
        return os.path.join(out, "table_2", cell.row_folder, _slug(cell.column), f"seed_{seed}")
    if table_2_row is not None:
        return os.path.join(out, "table_2", table_2_row, _slug(cell.settings["defender"]), f"seed_{seed}")
    return os.path.join(out, f"table_{table.key}", cell.row_folder, _slug(cell.column), f"seed_{seed}")


def _table_2_configs(table, scale, seeds, runs, *, data_root, device, overrides):
    """[(Table 2 row, seed, Config of its run)] for the attacks and defenders of `runs`, at the same scale and
    overrides (empty for a CIFAR table: Table 2 is MNIST)."""
    if table.key == "2" or (table.cifar and scale == "paper"):
        return []
    cells = {(cell.settings["attack"], cell.settings["defender"]) for cell, _, _ in runs}
    table_2 = plan(TABLES["2"], scale, seeds, data_root=data_root, device=device,
                   defenders=sorted({d for _, d in cells}), attacks=sorted({a for a, _ in cells}), overrides=overrides)
    return [(cell.row_folder, seed, cfg) for cell, seed, cfg in table_2 if (cell.settings["attack"], cell.column) in cells]


def _table_2_row(table_2, seed, cfg):
    """The row folder of the Table 2 run whose settings are cfg's, or None."""
    return next((row for row, s, c in table_2 if s == seed and c == cfg), None)


def _resumed(step, folder, overwrite):
    """step(fresh=False) (resume what the folder holds), or with `overwrite` step(fresh=True) where the folder
    holds other settings or a damaged file. Without `overwrite` a damaged file stops the bench with its own
    message (the file and the command that writes it again)."""
    try:
        return step(fresh=False)
    except RunFolderError as exc:
        if overwrite:
            return step(fresh=True)
        if isinstance(exc, OtherSettingsError):
            raise RunFolderError(f"{folder} holds a run with other settings ({exc.changed}; an earlier bench with "
                                 "other options or code): rerun with --overwrite to replace it, or use another "
                                 "--out") from None
        raise


# The bench's store of clean pretrainings (protocol.stage_pretrain's `shared`), under --out.
PRETRAINED_FOLDER = "pretrained"


def _run_cell(cell, scale, cfg, folder, overwrite, diverged, shared_pretraining=None):
    """The metrics of one run of a cell (under its defense for a defense table), resumed where complete. A run
    that diverged is recorded in `diverged` (folder -> message) and not run again for the next defense.
    `shared_pretraining`: the bench's folder of clean pretrainings (protocol.stage_pretrain's `shared`)."""
    try:
        if folder in diverged:
            raise FloatingPointError(diverged[folder])
        try:
            metrics = _resumed(lambda fresh: protocol.run(cfg, folder, verbose=False, overwrite=fresh, resume=not fresh,
                                                          shared_pretraining=shared_pretraining), folder, overwrite)
        except FloatingPointError as exc:
            diverged[folder] = str(exc)
            raise
        if cell.defense is None:
            return metrics
        dcfg = defense_config(cell, scale)
        return _resumed(lambda fresh: protocol.stage_defend(folder, dcfg, overwrite=fresh, resume=not fresh),
                        os.path.join(folder, f"defense_{cell.defense}"), overwrite)
    except FloatingPointError as exc:  # a diverged training or attack is a result of the bench, not its end
        return {"diverged": f"{folder}: {exc}"}


def folder_job(items, scale, overwrite, shared_pretraining=None):
    """The cells that share one run folder, in order (a defense table's cells of one attack run: the attack
    runs once, then each defense): [(cell, cfg, folder)] -> [metrics]. One job of a cluster sweep."""
    diverged = {}
    with exclusive(items[0][2]):  # another bench making the same run (a shared Table 2 folder) waits for this one
        return [_run_cell(cell, scale, cfg, folder, overwrite, diverged, shared_pretraining)
                for cell, cfg, folder in items]


def run_table(table, scale, seeds, out, *, data_root=None, device="cpu", defenders=None, attacks=None,
              defenses=None, overrides=None, rows=None, overwrite=False, verbose=True, executor=None, jobs=1):
    """Runs (or resumes) every run of a table; writes and returns the rows (one dict a cell).

    Runs go one after the other in this process, or, with `executor` (a submitit executor:
    tgda_attack.cluster.make_executor), one job a run folder, at most `jobs` at once."""
    runs = plan(table, scale, seeds, data_root=data_root, device=device, defenders=defenders, attacks=attacks,
                defenses=defenses, overrides=overrides, rows=rows)
    if scale == "paper":
        check_readable(runs[0][2].dataset, data_root)  # before any run starts or folder is made
    table_2 = _table_2_configs(table, scale, seeds, runs, data_root=data_root, device=device, overrides=overrides)
    groups = {}  # run folder -> [(cell, cfg, folder)], in plan order
    for cell, seed, cfg in runs:
        folder = run_folder(out, table, cell, seed, table_2_row=_table_2_row(table_2, seed, cfg))
        groups.setdefault(folder, []).append((cell, cfg, folder))
    groups = list(groups.values())
    shared = os.path.join(out, PRETRAINED_FOLDER)  # cells that pretrain the same clean models train them once
    bar = progress_bar(total=len(runs), desc=f"table {table.key} ({scale})", disable=not verbose)
    if executor is None:
        outcomes = []
        for items in groups:
            bar.set_postfix_str(" / ".join(items[0][0].key[:2]) + f" / {os.path.basename(items[0][2])}")
            outcomes.append(folder_job(items, scale, overwrite, shared))
            bar.update(len(items))
    else:
        outcomes = cluster.run_jobs(executor, folder_job, [(items, scale, overwrite, shared) for items in groups], jobs=jobs,
                                    on_done=lambda i, result: bar.update(len(result)))
    bar.close()
    results, threads = {}, {}
    for items, metrics_list in zip(groups, outcomes):
        made_with = _attack_threads(items[0][2])  # one run folder a group: its cells (a defense table's) share it
        for (cell, _, _), metrics in zip(items, metrics_list):
            results.setdefault(cell.key, []).append(metrics)
            threads.setdefault(cell.key, set()).add(made_with)
    cells = {cell.key: cell for cell, _, _ in runs}
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}  # the paper's own (epsilon 0.03 ...)
    outside = [k for k in OUTSIDE_THE_PAPER if k in (overrides or {}) and overrides[k] != defaults[k]]
    made = {k: v for k, v in (overrides or {}).items() if k not in EXECUTION}  # how runs executed: their own record
    unread = {cell.key: [k for k in made if k in ATTACKS[cfg.attack].unread_settings(cfg)] for cell, _, cfg in runs}
    rows = [_row(table, scale, cells[key], runs_, overrides_text(made), outside, threads[key] - {None}, unread[key])
            for key, runs_ in results.items()]
    write_outputs(table, scale, rows, out)
    return rows


# `--set` settings that make another experiment than the paper's table (another budget, another tested model, another
# attacker's knowledge): its figures are then not shown beside ours.
OUTSIDE_THE_PAPER = ("epsilon", "eval_defender", "perfect_knowledge")


# A table's numbers are in the units it prints (a run's metrics.json and summary.json hold fractions: 0.857 is 85.7%)
UNITS = ("percent: accuracies, drops (points), precision, recall; seconds: attack_seconds; pixel units of the data's "
         "[-1, 1] range: perturbations; counts: seeds, removals")


def _attack_threads(folder):
    """The CPU threads the run in `folder` made its poisons with (attack.json), None where it does not say."""
    try:
        threads = read_json(os.path.join(folder, "attack.json")).get("threads")
    except (OSError, ValueError, AttributeError):
        return None
    return threads if isinstance(threads, int) and not isinstance(threads, bool) else None


def _row(table, scale, cell, runs, overrides="", outside=(), threads=(), unread=()):
    row, column = cell.row, cell.column
    done = [r for r in runs if "diverged" not in r]
    failed = [r["diverged"] for r in runs if "diverged" in r]
    out = {"table": table.key, "scale": scale, "overrides": overrides, "outside_the_paper": ", ".join(outside),
           "overrides_not_read": ", ".join(unread),  # --set settings of a recipe of its own (the authors' GC)
           "threads": ", ".join(map(str, sorted(threads))),  # a seed fixes a run's bits for one thread count
           table.row_name: row, "column": column,
           "seeds": len(runs), "diverged": len(failed), "diverged_messages": " | ".join(failed), "units": UNITS}
    for key, scale_by in (("clean_accuracy", 100), ("poisoned_accuracy", 100), ("accuracy_drop", 100),
                          ("attack_seconds", 1), ("mean_perturbation_linf", 1)):
        mean, std = mean_std([scale_by * r[key] for r in done if key in r])
        out[f"{key}_mean"], out[f"{key}_std"] = mean, std
    _last_epochs_columns(out, done, "accuracy_drop", ("clean_accuracy_last_epochs", "poisoned_accuracy_last_epochs"))
    pooled = [100 * d for r in done for d in (r.get("retrainings") or {}).get("accuracy_drop", []) if d is not None]
    out["retrained_drops"] = len(pooled)  # every retraining of every seed (stage 3 with `retrainings` > 1)
    out["retrained_drop_mean"], out["retrained_drop_std"] = mean_std(pooled)
    if cell.defense is not None:
        return _defense_row(table, scale, cell, done, out)
    paper = table.paper.get((row, column)) if not outside and (scale == "paper" or not table.cifar) else None
    out["paper_accuracy"] = paper.accuracy if paper else None
    out["paper_drop"] = paper.drop if paper else None
    out["paper_hours"] = paper.hours if paper else None
    out["paper_source"] = paper.source if paper else None
    tested = cell.settings.get("eval_defender") or cell.settings["defender"]
    out["paper_clean"] = (table.paper_clean.get(tested, table.paper_clean.get(column))
                          if paper and paper.source is None else None)
    return out


DEFENSE_COLUMNS = (("defended_accuracy", 100), ("defended_drop", 100), ("clean_defended_accuracy", 100),
                   ("attack_drop_under_defense", 100), ("poisons_removed", 1), ("clean_removed", 1), ("precision", 100),
                   ("recall", 100), ("defended_training_seconds", 1))


def _last_epochs_columns(out, done, drop, entries):
    """A row's `drop` between the medians of its trainings' last epochs (protocol.LAST_EPOCHS; over the runs that
    recorded them, counted in DROP_median_last_epochs_runs) and how many of its runs end one of the trainings
    `entries` on a spike (the last epoch off that median by more than protocol.SPIKE): DROP_last_epoch_spikes."""
    for statistic in ("median", "mean"):  # the mean: in the CSV and JSON only
        key = f"{drop}_{statistic}_last_epochs"
        recorded = [100 * r[key] for r in done if isinstance(r.get(key), (int, float))]
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std(recorded)
        out[f"{key}_runs"] = len(recorded)
    out[f"{drop}_last_epoch_spikes"] = sum(any(isinstance(r.get(name), dict) and r[name].get("spike") is True
                                               for name in entries) for r in done)


def _defense_row(table, scale, cell, done, out):
    out["defense"] = cell.defense
    _last_epochs_columns(out, done, "attack_drop_under_defense",
                         ("clean_defended_accuracy_last_epochs", "defended_accuracy_last_epochs"))
    out["defender_validation"] = None  # a run recorded before the setting existed validated on the attacker's D_v
    if DEFENSES[cell.defense].validates:
        out["defender_validation"] = "; ".join(sorted({r.get("defender_validation", "the attacker's D_v") for r in done}))
    for key, scale_by in DEFENSE_COLUMNS:
        mean, std = mean_std([scale_by * r[key] for r in done if r.get(key) is not None])
        out[f"{key}_mean"], out[f"{key}_std"] = mean, std
    paper = table.paper.get(cell.key)
    out["paper_drop"] = paper.drop if paper else None
    out["paper_defended_drop"] = paper.defended_drop if paper else None
    return out


def defense_markdown(table, scale, rows):
    """A defense table as Markdown: one line an (attack, defender, defense), ours beside the paper's."""
    medians = _has_medians(rows, "attack_drop_under_defense")
    lines = [f"### Table {table.key}: {table.title} ({_scale_label(scale, rows)})\n",
             "Drops are in points of test accuracy from the clean accuracy without defense (the paper's), and from the "
             "accuracy the same defense gives on the clean D_tr (\"clean acc. with defense\", its own cost); a filter's removed points are counts per run "
             "(precision: the share of removed points that are poisons; recall: the share of poisons removed). Ours: mean "
             "± sample standard deviation (n - 1) over seeds; a cell of one seed shows its value alone.\n",
             "| attack | defender | defense | seeds | clean acc. (%) | drop without defense | drop with defense "
             "| clean acc. with defense (%) | drop with defense from it "
             + ("| the same, medians of the last epochs " if medians else "")
             + "| poisons / clean points removed | precision / recall (%) | paper: drop without / with |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if medians else "")]
    sources = sorted({r["defender_validation"] for r in rows if r.get("defender_validation")})
    if sources:
        lines.insert(2, f"The defenses that score against the defender's validation set (influence) used: "
                        f"{'; '.join(sources)}" + (" (the set the attacks were made to hurt; `--set "
                                                    "defender_val_fraction=F` holds a share of D_v out as the "
                                                    "defender's own)" if "the attacker's D_v" in sources else "")
                        + ".\n")
    for r in rows:
        seeds = f"{r['seeds']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        removed = prec = "—"
        if r["poisons_removed_mean"] is not None:
            removed = f"{r['poisons_removed_mean']:.1f} / {r['clean_removed_mean']:.1f}"
            prec = f"{_fmt(r['precision_mean'], r['precision_std'], 1)} / {_fmt(r['recall_mean'], r['recall_std'], 1)}"
        paper = "—" if r["paper_drop"] is None else f"{r['paper_drop']:.2f} / {r['paper_defended_drop']:.2f}"
        lines.append(f"| {r['attack']} | {r['column']} | {r['defense']} | {seeds} "
                     f"| {_fmt(r['clean_accuracy_mean'], r['clean_accuracy_std'])} "
                     f"| {_fmt(r['accuracy_drop_mean'], r['accuracy_drop_std'])} "
                     f"| {_fmt(r['defended_drop_mean'], r['defended_drop_std'])} "
                     f"| {_fmt(r['clean_defended_accuracy_mean'], r['clean_defended_accuracy_std'])} "
                     f"| {_fmt(r['attack_drop_under_defense_mean'], r['attack_drop_under_defense_std'])}"
                     + _last_epochs_cells(r, "attack_drop_under_defense", medians)
                     + f"| {removed} | {prec} | {paper} |")
    return "\n".join(lines) + "\n" + _diverged_footnote(rows) + _spike_footnote(rows) + _unread_footnote(table, rows)


def _has_medians(rows, drop):
    """Whether any row holds a drop between the medians of the last epochs (runs recorded before they existed hold
    none: the column is left out)."""
    return any(r.get(f"{drop}_median_last_epochs_mean") is not None for r in rows)


def _last_epochs_cells(r, drop, medians):
    """What follows the cell of `drop`: with the column of the medians of the last epochs (`medians`), that cell (the
    runs it is over where not all of the row's, its spiked runs counted); without it, the count of spiked runs."""
    n = r.get(f"{drop}_last_epoch_spikes")
    spikes = f" ({n} spiked)" if n else ""
    if not medians:
        return f"{spikes} "
    runs, finished = r[f"{drop}_median_last_epochs_runs"], r["seeds"] - r["diverged"]
    over = f" ({runs} of {finished} runs)" if runs < finished else ""
    return f" | {_fmt(r[f'{drop}_median_last_epochs_mean'], r[f'{drop}_median_last_epochs_std'])}{over}{spikes} "


def _spike_footnote(rows):
    """The sentence under a table that shows the drops between the medians of the trainings' last epochs, or counts
    spiked runs."""
    drops = ("accuracy_drop", "attack_drop_under_defense")
    if not any(_has_medians(rows, drop) or any(r.get(f"{drop}_last_epoch_spikes") for r in rows) for drop in drops):
        return ""
    return (f"\n\"medians of the last epochs\": each training (clean and poisoned, with or without the defense) is also "
            f"tested after each epoch of its last tenth (at most {protocol.LAST_EPOCHS}), and the drop is taken between "
            "the medians of those accuracies (\"k of n runs\": over the runs that recorded them; runs made before the "
            "record existed hold none); \"spiked\": runs one of whose trainings reads, after its last epoch, more than "
            f"{100 * protocol.SPIKE:g} point from the median of its last epochs (one epoch's reading, not where the "
            "training stood over its last epochs: read the median column for them).\n")


def _unread_footnote(table, rows):
    """The sentence under a table whose title names `--set` settings of an attack that some of that attack's rows do
    not read, running a recipe of their own (the authors' Gradient Canceling: Attack.unread_settings); "" when none.
    Settings of another attack (gc_steps beside label flip) are not named: a row reads only its own attack's."""
    unread = {}
    for r in rows:
        if r.get("overrides_not_read"):
            unread.setdefault(r["overrides_not_read"], []).append(f"{r[table.row_name]} ({r['column']})")
    return "".join(f"\nNot read by {', '.join(names)}: {settings} (a recipe of its own; its runs used their recipe's "
                   "values).\n" for settings, names in unread.items())


def _diverged_footnote(rows):
    """The sentence under a table some of whose runs diverged ("" when none did)."""
    if not any(r["diverged"] for r in rows):
        return ""
    return ("\n\"diverged\": a training of the defender (pretraining, or retraining on the poisoned set) or the "
            "attack blew up (loss to inf or nan) at the run's learning rate, so that run has no accuracy; a row's "
            "numbers are over its other seeds. Each diverged run's folder and message are in the column "
            "diverged_messages of the table's CSV and JSON.\n")


def _time(seconds):
    if seconds is None:
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _scale_label(scale, rows):
    overrides = rows[0].get("overrides") if rows else ""
    outside = rows[0].get("outside_the_paper") if rows else ""
    threads = sorted({t for r in rows for t in str(r.get("threads") or "").split(", ") if t}, key=int)
    return (f"{scale} scale" + (f", with {overrides}" if overrides else "")
            + (f", poisons made with {' or '.join(threads)} CPU thread{'s' if threads != ['1'] else ''}" if threads else "")
            + (f"; {outside} other than the paper's: its figures are not shown beside ours" if outside else ""))


def markdown(table, scale, rows):
    """The table as Markdown: one line a cell, ours (mean ± std over seeds) beside the paper's."""
    if table.defenses:
        return defense_markdown(table, scale, rows)
    label = _scale_label(scale, rows)
    head = (f"### Table {table.key}: {table.title} ({label})\n\n"
            if table.key != "figure-4" else f"### {table.title} ({label})\n\n")
    if table.cifar and scale != "paper":
        head += "The paper ran this table on CIFAR-10; at this scale it runs on MNIST, so no paper numbers are beside.\n\n"
    if any(r[table.row_name] == GC_AUTHORS_ROW for r in rows):
        head += (f"\"{GC_AUTHORS_ROW}\": the attack as its authors' code runs it (no projection: its poisons "
                 "leave the pixel range), against their network of the column's kind (gc-lr, gc-nn, gc-cnn) with their "
                 "evaluation, so its clean accuracy is that network's; beside it the drop of the GC paper "
                 "(Lu, Kamath & Yu, ICML 2023, Table 2).\n\n")
    if any(r[table.row_name].endswith("long follower)") for r in rows):
        head += (f"\"long follower\": min-max's defender takes {LONG_FOLLOWER} times the other rows' gradient steps a "
                 f"round (follower_steps; {LONG_FOLLOWER * Config.follower_steps} at the default "
                 f"{Config.follower_steps}).\n\n")
    if any(r[table.row_name] in LABEL_FLIP_ROWS for r in rows):
        head += ("\"label-flip (nearest, D_v)\": label flip whose poisons are points of the attacker's D_v (real images "
                 "the defender does not train on), each labelled with the wrong class the trained defender finds most "
                 "probable (`--flip-rule nearest --flip-pool val`); \"(confused pairs, D_v)\": the same, its points only "
                 "of the fewest (class, nearest class) pairs that hold the budget (`--flip-select confused-pairs`); "
                 "\"(influence, D_v)\": the points of D_v and wrong labels whose gradient step under the trained "
                 "defender raises its loss on D_v the most to first order (`--flip-rule influence --flip-select "
                 "influence`).\n\n")
    retrained = any(r.get("retrained_drops") for r in rows)
    if retrained:
        head += ("\"drop over retrainings\": each seed's poisons retrained under K training seeds (`retrainings` K: "
                 "the seed's own and seed + k * 2^20, k = 1 .. K-1, no two seeds sharing one), each beside a clean "
                 "training of its seed; mean ± std of all those drops (their count in brackets): how much of a drop the "
                 "defender's own training randomness decides.\n\n")
    head += ("Ours: mean ± sample standard deviation (n - 1) over seeds; a cell of one seed shows its value alone. "
             "L∞ perturbation: the largest change of one pixel from a poison's source image, a mean over poisons, in "
             "the data's pixel units (pixels in [-1, 1]: 2 spans the whole range).\n\n")
    medians = _has_medians(rows, "accuracy_drop")
    lines = [f"| {table.row_name} | column | seeds | clean acc. (%) | poisoned acc. (%) | drop (points) "
             + ("| drop, medians of the last epochs " if medians else "")
             + ("| drop over retrainings " if retrained else "")
             + "| attack time | L∞ perturbation | paper: clean / poisoned / drop | paper time |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if medians else "") + ("---|" if retrained else "")]
    for r in rows:
        paper = "—"
        if r["paper_drop"] is not None:
            paper = " / ".join("—" if v is None else f"{v:.2f}" for v in (r["paper_clean"], r["paper_accuracy"], r["paper_drop"]))
            if r.get("paper_source"):
                paper += f" ({r['paper_source']})"
        hours = "" if r["paper_hours"] is None else f"{r['paper_hours']:g} h"
        seeds = f"{r['seeds']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        lines.append(f"| {r[table.row_name]} | {r['column']} | {seeds} | {_fmt(r['clean_accuracy_mean'], r['clean_accuracy_std'])} "
                     f"| {_fmt(r['poisoned_accuracy_mean'], r['poisoned_accuracy_std'])} "
                     f"| {_fmt(r['accuracy_drop_mean'], r['accuracy_drop_std'])}"
                     + _last_epochs_cells(r, "accuracy_drop", medians)
                     + (f"| {_fmt(r['retrained_drop_mean'], r['retrained_drop_std'])} ({r['retrained_drops']}) "
                        if retrained else "")
                     + f"| {_time(r['attack_seconds_mean'])} "
                     f"| {_fmt(r['mean_perturbation_linf_mean'], r['mean_perturbation_linf_std'], 3)} | {paper} | {hours} |")
    return (head + "\n".join(lines) + "\n" + _diverged_footnote(rows) + _spike_footnote(rows)
            + _unread_footnote(table, rows))


def write_outputs(table, scale, rows, out):
    """OUT/table_N.{md,csv,json} (and the figure's PNG)."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"table_{table.key}")
    with open(stem + ".md.tmp", "w") as fh:
        fh.write(markdown(table, scale, rows))
    os.replace(stem + ".md.tmp", stem + ".md")
    with open(stem + ".csv.tmp", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(stem + ".csv.tmp", stem + ".csv")
    write_json(stem + ".json", rows)
    if table.key == "figure-4":
        save_epsilon_figure(rows, stem + ".png")


def epsilon_curves(rows):
    """Figure 4's data: {defender: {attack: [(epsilon, drop mean, drop std, note)]}} sorted by epsilon, where
    note says how many of a point's seeds diverged ("1/3 diverged"; "" when none). A point whose every seed
    diverged has no drop (None): it is drawn as a mark on the axis, not as a value."""
    curves = {}
    for r in rows:
        defender, eps = r["column"].split(" eps=")
        note = f"{r['diverged']}/{r['seeds']} diverged" if r["diverged"] else ""
        curves.setdefault(defender, {}).setdefault(r["attack"], []).append(
            (float(eps), r["accuracy_drop_mean"], r["accuracy_drop_std"], note))
    for lines in curves.values():
        for points in lines.values():
            points.sort(key=lambda p: p[0])
    return curves


def save_epsilon_figure(rows, path):
    """Figure 4: the accuracy drop against epsilon, one panel a defender, one line an attack; a point some of
    whose seeds diverged (the defender could not be trained on the poisoned set) says so beside it."""
    from .report import plt, save_figure

    curves = epsilon_curves(rows)
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (defender, lines) in zip(axes[0], curves.items()):
        for attack, points in lines.items():
            drawn, color = [p for p in points if p[1] is not None], None
            if drawn:
                line = ax.errorbar([p[0] for p in drawn], [p[1] for p in drawn], yerr=[p[2] or 0.0 for p in drawn],
                                   marker="o", capsize=3, label=attack)
                color = line[0].get_color()
            for eps, mean, _, note in points:
                if mean is not None and note:
                    ax.annotate(note, (eps, mean), xytext=(4, 4), textcoords="offset points", fontsize=6,
                                color=color)
                elif mean is None:  # every seed diverged: no drop to draw
                    ax.annotate(f"{attack}: {note}", (eps, 0.02), xycoords=("data", "axes fraction"), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (poisons / |D_tr|)")
        ax.set_ylabel("accuracy drop (points)")
        ax.set_title(f"MNIST, {defender.upper()}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)

