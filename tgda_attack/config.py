"""The settings of one run of the protocol of Lu, Kamath & Yu (TMLR 2022), Section 4.2 and 5.1, and
every check on them, made before any data is loaded or any model trained.

Config holds every setting; None values are filled from DATASET_DEFAULTS by `resolved()`, which also
checks types, ranges, choices and the device, so that a wrong value stops a run at once with a
message that names it. The protocol's own settings are the fields of _ProtocolSettings; each attack
adds the settings only it reads (PoisoningAttack.settings), so that Config is those fields followed by
every registered attack's. CHOICES lists each setting's allowed values, taken from the module that
owns them; the command line reads its choices and types from here.
"""
import dataclasses
import difflib
import math
import typing

import torch

import hypergrad

from .attacks import ATTACKS, FLIP_RULES
from .attacks.base import INITS, registered_settings
from .attacks.tgda import DEFAULT_SOLVER, FORMULATIONS, LEADERS, WARM_STARTS
from .data import DATASETS
from .data_parallel import DP_MODES
from .defenses import DEFENSES
from .models import ATTACKERS, DEFENDERS

ATTACKER_NAMES = (*ATTACKERS, "pixels")  # "pixels": the poisons themselves are the leader's parameters
DTYPES = ("float32", "float64")
MNIST_ONLY_DEFENDERS = ("gc-lr", "gc-nn", "gc-cnn")  # behind MNIST's input normalisation (models.MnistStandardize)
LINEAR_CHAIN_DEFENDERS = ("lr", "nn")  # the defenders whose solves can be recorded as CUDA graphs

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

ATTACK_SETTINGS = registered_settings(ATTACKS)  # the settings the registered attacks add, each checked by its Setting
# Protocol settings only a TGDA run reads (its game, its solve, its attacker network), and settings of how a run
# executes rather than what it computes: neither is part of another run's identity (identity_of), so that,
# for instance, a label-flip folder resumes whatever the solver's default has become since it was written.
TGDA_ONLY = ("alpha", "leader_steps", "solver", "solver_iterations", "damping", "cuda_graphs", "warm_start", "leader",
             "formulation", "attacker", "pretrain_attacker", "attacker_epochs", "attacker_batch_size")
EXECUTION = ("threads", "device")  # a run resumes, or is evaluated, with others (a GPU run's folder on a CPU)
# Defaults changed since runs were first written: by setting, the value that says what a folder written before the
# change ran. A config.json without the setting (written before it existed) is read with this value, not today's
# default: a folder of plain gradient descent is not a run with the bound of 5.
FORMER_DEFAULTS = {"solver": "cgnr",  # issue 21: cgnr -> minres
                   "pretrain_max_grad_norm": 0.0}  # eeb4fd5: the gradient-norm bound of 5; plain descent before


def as_recorded(values):
    """The settings of a run folder's config.json, each setting it lacks that FORMER_DEFAULTS names at its former
    default (the code that wrote the folder ran that); other missing settings stay missing (today's default)."""
    return {**{name: value for name, value in FORMER_DEFAULTS.items() if name not in values}, **values}


def identity_of(values):
    """The settings (a dict, as config.json holds them) that make a run what it is: the protocol's, less TGDA's
    own for another attack and the execution settings, and the run's attack's own settings (not the others')."""
    attack = values.get("attack")
    own = {s.name for s in ATTACKS[attack].settings} if attack in ATTACKS else set()
    drop = ({s.name for s in ATTACK_SETTINGS} - own) | set(EXECUTION) | (set(TGDA_ONLY) if attack != "tgda" else set())
    return {k: v for k, v in values.items() if k not in drop}
CHOICES = {
    "dataset": DATASETS, "defender": tuple(DEFENDERS), "eval_defender": tuple(DEFENDERS), "attack": tuple(ATTACKS), "attacker": ATTACKER_NAMES,
    "poison_init": INITS, "dp_mode": DP_MODES, "flip_rule": FLIP_RULES, "solver": tuple(hypergrad.METHODS), "warm_start": WARM_STARTS,
    "leader": LEADERS, "formulation": FORMULATIONS, "dtype": DTYPES,
    **{s.name: s.check for s in ATTACK_SETTINGS if isinstance(s.check, tuple)},
}
NON_NEGATIVE_INTS = ("attacker_epochs", "attack_epochs", "leader_steps", "follower_steps",
                     "solver_iterations", "threads")
SEEDS = ("seed", "split_seed")  # torch's generators take 0 .. 2**64 - 1 and wrap negatives onto its top end
POSITIVE_INTS = ("pretrain_epochs",  # 0: a defender at chance, and no retraining to measure a drop on
                 "pretrain_batch_size", "attacker_batch_size", "attack_batch_size", "retrainings")
POSITIVE_FLOATS = ("pretrain_lr", "alpha", "beta")
RETRAINING_SEED_STRIDE = 2 ** 20  # retraining k of run seed s trains under s + k * stride (retraining_seeds)
MAX_RETRAININGS = 2 ** 32 // RETRAINING_SEED_STRIDE  # 4096: that many training seeds stay distinct below 2**32
MAX_THREADS = 1024  # torch.set_num_threads: 10,000 hung and 100,000 crashed (segfault) on a 2-core machine


PROTOCOL_HELP = {  # the command line's help of the protocol settings that need more than their name
    "defender_val_fraction": "share of D_v held out from the attacker (taken from its end) as the defender's own "
                             "validation set, which the influence defense scores against; 0: the influence defense "
                             "validates on the attacker's D_v, the set the attacks were made to hurt",
}


@dataclasses.dataclass
class _ProtocolSettings:
    """The protocol's own settings (Config adds the attacks'); None values are filled from DATASET_DEFAULTS."""

    dataset: str = "mnist-sample"
    data_root: str = None
    download: bool = False
    defender: str = "lr"
    eval_defender: str = None  # transfer (Table 9): poisons made against `defender` tested on this one
    perfect_knowledge: bool = False  # the attacker's D_v is D_test (Koh et al. 2018's setting)
    defender_val_fraction: float = 0.0  # share of D_v held out from the attacker as the defender's (PROTOCOL_HELP)
    dp_mode: str = "sharded"  # under torchrun: one attack over shards of every batch, or independent partitions
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
    pretrain_max_grad_norm: float = 5.0  # a step's gradient scaled down to this L2 norm (0: plain GD); training.py says why
    pretrain_attacker: bool = True
    retrainings: int = 1  # stage 3 retrains the poisoned (and the clean) set under K training seeds (protocol.py)
    attacker_epochs: int = None
    attacker_batch_size: int = None
    attack_epochs: int = None
    attack_batch_size: int = None
    alpha: float = None
    leader_steps: int = 1
    beta: float = None
    follower_steps: int = 20
    solver: str = DEFAULT_SOLVER  # MINRES; "cgnr" is the paper's (attacks/tgda.py says why not the default)
    solver_iterations: int = 16
    damping: float = 0.0
    cuda_graphs: bool = False
    warm_start: str = "partial"
    leader: str = "attacker"
    formulation: str = "non-zero-sum"
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 0  # CPU threads of a process (torch.set_num_threads); 0: torch's choice (OMP_NUM_THREADS or the cores)

    def resolved(self):
        """A copy with the dataset's defaults filled in; raises ValueError naming the first bad setting."""
        self._check_types()
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"unknown {name.replace('_', '-')} {value!r}; choose one of {', '.join(allowed)}")
        filled = dataclasses.replace(self, **{k: v for k, v in DATASET_DEFAULTS[self.dataset].items()
                                              if getattr(self, k) is None})
        filled._check_values()
        return filled

    @classmethod
    def from_dict(cls, values, also_known=()):
        """The settings `values` ({name: value}); ValueError naming each unknown name and the nearest known one (a
        typo), `also_known` counted among them (names a caller reads itself, as the command line its defense's)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        known = sorted(fields | set(also_known))
        unknown = sorted(set(values) - set(known))
        if unknown:  # the nearest names, not the whole list of some eighty
            guesses = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            raise ValueError("unknown setting(s) " + ", ".join(
                f"{k!r}" + (f" (did you mean {guesses[k][0]!r}?)" if guesses[k] else "") for k in unknown)
                + "; `tgda-attack run --help` lists them (dashes there, underscores in a file)")
        return cls(**{k: v for k, v in values.items() if k in fields})

    def identity(self):
        """identity_of this run's settings."""
        return identity_of(dataclasses.asdict(self))

    identity_of = staticmethod(identity_of)
    ATTACK_SPECIFIC = frozenset(TGDA_ONLY) | {s.name for s in ATTACK_SETTINGS}  # read by some attacks only
    FORMER_DEFAULTS = FORMER_DEFAULTS
    as_recorded = staticmethod(as_recorded)

    def _check_types(self):
        _check_types(self)

    def _check_values(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # nan would pass the range checks below, and no run equals itself
            value = getattr(self, f.name)
            if hints[f.name] is float and value is not None and not math.isfinite(value):
                raise ValueError(f"{f.name.replace('_', '-')} must be a finite number, got {value}")
        if not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon is the poison budget as a fraction of the training set, in (0, 1]; got {self.epsilon}")
        for name in NON_NEGATIVE_INTS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in SEEDS:
            if not 0 <= getattr(self, name) < 2 ** 32:
                raise ValueError(f"{name.replace('_', '-')} must be in 0 .. 2**32 - 1, got {getattr(self, name)}")
        for name in POSITIVE_INTS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.retrainings > MAX_RETRAININGS:
            raise ValueError(f"retrainings must be at most {MAX_RETRAININGS} (each a training of the defender; their "
                             f"training seeds stay distinct up to there), got {self.retrainings}")
        for name in POSITIVE_FLOATS:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        check_threads(self.threads)
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if not 0 <= self.defender_val_fraction < 1:
            raise ValueError(f"defender-val-fraction is the share of D_v held out from the attacker as the defender's "
                             f"own validation set, in [0, 1) (0: the defender validates on the attacker's D_v); got "
                             f"{self.defender_val_fraction}")
        if self.defender_val_fraction and self.perfect_knowledge:
            raise ValueError("--defender-val-fraction with --perfect-knowledge: the attacker's D_v is then D_test, so "
                             "the defender validates on a D_v the attacker never sees already; drop one of the two")
        if self.pretrain_max_grad_norm < 0:
            raise ValueError(f"pretrain-max-grad-norm must be >= 0 (0: no bound, plain gradient descent), "
                             f"got {self.pretrain_max_grad_norm}")
        for setting in ATTACK_SETTINGS:
            problem = setting.problem(getattr(self, setting.name))
            if problem:
                raise ValueError(problem)
        ATTACKS[self.attack].check_config(self)
        if self.feasible_set != "box" and "feasible_set" not in {s.name for s in ATTACKS[self.attack].settings}:
            takes = ", ".join(a for a, cls in ATTACKS.items() if "feasible_set" in {s.name for s in cls.settings})
            raise ValueError(f"attack {self.attack} does not keep its poisons in a feasible set (these do: {takes}); "
                             "drop --feasible-set")
        if self.cuda_graphs and self.attack == "tgda" and (self.defender not in LINEAR_CHAIN_DEFENDERS
                                                          or self.leader != "attacker"):
            raise ValueError(f"cuda-graphs records the solves of an {' or '.join(LINEAR_CHAIN_DEFENDERS)} defender "
                             f"with the attacker as leader; got defender {self.defender!r}, leader {self.leader!r}")
        for role in ("defender", "eval_defender"):
            if getattr(self, role) in MNIST_ONLY_DEFENDERS and not self.dataset.startswith("mnist"):
                raise ValueError(f"{role.replace('_', '-')} {getattr(self, role)} is an MNIST model (the Gradient "
                                 f"Canceling authors'); dataset {self.dataset} needs another: "
                                 f"{', '.join(d for d in DEFENDERS if d not in MNIST_ONLY_DEFENDERS)}")
        check_device(self.device)


def _check_types(settings):
    """Raises ValueError naming the first field of the dataclass `settings` whose value has the wrong type."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        value, kind = getattr(settings, f.name), hints[f.name]
        if value is None and f.default is None:
            continue
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, kind))
        if not ok:
            raise ValueError(f"setting {f.name} must be {'a number' if kind is float else kind.__name__}, "
                             f"got {value!r}")


def _with_attack_settings(base):
    clash = sorted({s.name for s in ATTACK_SETTINGS} & {f.name for f in dataclasses.fields(base)})
    if clash:
        raise TypeError(f"attack settings {clash} clash with the protocol's own")
    cls = dataclasses.make_dataclass("Config", [(s.name, s.type, s.default) for s in ATTACK_SETTINGS], bases=(base,))
    cls.__module__, cls.__doc__ = __name__, (
        "Every setting of one protocol run: the protocol's own (_ProtocolSettings), then those of the attacks "
        "(PoisoningAttack.settings); None values are filled from DATASET_DEFAULTS by resolved().")
    return cls


Config = _with_attack_settings(_ProtocolSettings)

DEFENSE_SETTINGS = registered_settings(DEFENSES)  # the settings the registered defenses read


@dataclasses.dataclass(frozen=True)
class _DefenseName:
    defense: str

    def checked(self):
        """self, or ValueError naming the first bad setting (unknown defense, wrong type, out of range)."""
        if self.defense not in DEFENSES:
            raise ValueError(f"unknown defense {self.defense!r}; choose one of {', '.join(DEFENSES)}")
        _check_types(self)
        for setting in DEFENSES[self.defense].settings:
            problem = setting.problem(getattr(self, setting.name))
            if problem:
                raise ValueError(problem)
        try:  # the defense's own checks (ranges its constructor refuses), before any run: not after stage 3
            DEFENSES[self.defense].from_config(self)
        except (TypeError, ValueError) as exc:
            given = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.own_settings().items())
            raise ValueError(f"defense {self.defense} refuses its settings ({given}): {exc}") from None
        return self

    def own_settings(self):
        """{setting: value} of the settings the chosen defense reads (what its results are recorded under)."""
        return {s.name: getattr(self, s.name) for s in DEFENSES[self.defense].settings}


DefenseConfig = dataclasses.make_dataclass(
    "DefenseConfig", [(s.name, s.type, s.default) for s in DEFENSE_SETTINGS], bases=(_DefenseName,), frozen=True)
DefenseConfig.__module__, DefenseConfig.__doc__ = __name__, (
    "A defense of the test stage (tgda_attack.defenses.DEFENSES) and the settings the registered defenses read "
    "(Defense.settings); checked() checks them.")


# Retraining k of the run of seed s trains under the training seed s + k * RETRAINING_SEED_STRIDE (mod 2**32: torch's
# CPU generator seeds from the low 32 bits, so 4 and 4 + 2**32 are one stream): no two run seeds below the stride (the
# bench's 0 .. K-1, `--seeds`) share one, for up to MAX_RETRAININGS retrainings. Under seeds s + k the blocks of
# neighbouring run seeds overlapped: seed 1's clean model was seed 0's second clean retraining, and with poisons that
# do not depend on the seed (a label flip by a fixed rule) seed 0's pairs 1..K-1 were seed 1's 0..K-2, counted twice
# in a pooled mean and std.
def retraining_seeds(seed, k):
    """The training seeds of a run's `k` retrainings, the run's own seed first (protocol's stage 3; the report names
    them)."""
    return [(seed + i * RETRAINING_SEED_STRIDE) % 2 ** 32 for i in range(k)]


def check_threads(threads):
    """Raises ValueError unless `threads` is a thread count a run can take (0: torch's choice)."""
    if not 0 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be 0 (torch's choice: the cores of this machine) to at most {MAX_THREADS} "
                         f"(OpenMP hangs or crashes on many thousands of threads), got {threads}")


def check_device(device):
    """Raises ValueError unless `device` names a device torch can use here."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists twenty device types this project does not run on
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N (lower case)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is visible to torch here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif parsed.type != "cpu":
        raise ValueError(f"device {device!r}: only cpu and cuda devices are supported")
