"""The one interface every poisoning attack of tgda_attack implements, and the registry the protocol and
the command line read (in the style of the Adversarial Robustness Toolbox's PoisoningAttack).

An attack is built from its parameters, which are checked once, at construction (`_check_params`),
or from a run's settings (`from_config`), and then called as

    x_poison, y_poison = attack.poison(x, y, x_val=None, y_val=None)

with the same signature for every attack: (x, y) is D_tr, (x_val, y_val) the attacker's D_v where the
attack uses one. Every subclass's poison() checks that data first (PoisoningAttack._check_inputs, wrapped
around it by __init_subclass__): lengths, NaN pixels, labels that are class indices, and the pixel range an
attack that moves pixels clamps its poisons to. It returns only the points to add to the training set, |D_p| = floor(epsilon |D_tr|),
and sets `source_indices_`, the indices into D_tr of the clean points D_p^0 the poisons start from.
An attack that perturbs training points in place instead of adding points (unlearnable examples) sets
`replaces_sources = True`: the defender is then retrained on D_tr with its source points replaced. An attack whose
poisons start from points of the attacker's D_v instead of D_tr sets `source_pool = "val"`; `source_indices_` then
index D_v.

Adding an attack: one module under tgda_attack/attacks/ with a PoisoningAttack subclass, and its class
in the tuple of tgda_attack/attacks/__init__.py. The protocol and the CLI need no other change: the
settings the attack adds to a run (its `settings`, a tuple of Setting) become fields of
tgda_attack.config.Config, options of the command line and keys of a config file, checked with every
other setting before any work starts.
"""
import copy
import dataclasses
import functools
import inspect
import os
import signal
import threading
import warnings

import torch

from ..data import NUM_CLASSES, check_points, poison_budget, poison_sources, split_train_val
from ..rundir import RunFolderError, load_state
from ..training import eval_mode, modes_restorer

INITS = ("first", "random")  # D_p^0: the first epsilon*N points of D_tr (the paper's) or a seeded choice
SOURCE_POOLS = ("train", "val")  # the split an attack's source_indices_ index: D_tr, or the attacker's D_v

# Copies of every batch a training holds in memory at once (MaxUp's m): beyond this the paper NN's batches of 1,000
# reach gigabytes, and some thousands ran out of memory at the defended training's first batch, after the stages before
MAX_BATCH_COPIES = 64

# What Setting.check may name: a rule on the value, or a tuple of the allowed values.
SETTING_CHECKS = {
    "count": (lambda v: v >= 0, "an integer >= 0"),
    "positive-count": (lambda v: v >= 1, "an integer >= 1"),
    "positive": (lambda v: v > 0, "a number > 0"),
    "non-negative": (lambda v: v >= 0, "a number >= 0"),
    "fraction": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "open-fraction": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "batch-copies": (lambda v: 1 <= v <= MAX_BATCH_COPIES, f"an integer from 1 to {MAX_BATCH_COPIES} (the copies of "
                                                           "every batch held in memory at once; MaxUp's own m is 4)"),
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting an attack adds to a run's configuration: a field of Config (`name`), the option
    --name-with-dashes, a key of a config file. `check` is a key of SETTING_CHECKS, a tuple of the
    allowed values, or None; two attacks may declare the same setting only identically."""

    name: str
    type: type
    default: object
    check: object = None
    help: str = ""

    def problem(self, value):
        """None if `value` is allowed, else what is wrong with it (one sentence)."""
        flag = self.name.replace("_", "-")
        if isinstance(self.check, tuple):
            return None if value in self.check else f"unknown {flag} {value!r}; choose one of {', '.join(self.check)}"
        if self.check is None:
            return None
        ok, wanted = SETTING_CHECKS[self.check]
        return None if ok(value) else f"{flag} must be {wanted}, got {value!r}"


class PoisoningAttack:
    """Base of the attacks. Subclasses set `name` (the registry key and --attack value) and
    `needs_attacker` when the protocol's first stage must pretrain an attacker network for them
    (as an autoencoder); `from_config` always receives the pretrained defender."""

    name = None
    needs_attacker = False
    differentiates_defender = True  # whether the attack takes gradients through its defender's parameters
    settings = ()  # Setting(...) for each run setting only this attack reads
    quick = {}  # Config values that make a run of this attack take seconds (the tests, `bench --scale smoke`)

    def __init__(self, epsilon=0.03, *, init="first", seed=0):
        self.epsilon, self.init, self.seed = epsilon, init, seed
        self.replaces_sources = False
        self.source_pool = "train"  # one of SOURCE_POOLS: the split source_indices_ index
        self.source_indices_ = None
        self.history = []  # what the attack logged as it ran (a dict every few steps or epochs)
        self.info_ = {}  # what it reports about its result (attack.json "info"), e.g. its target parameters
        self.earlier_seconds_ = 0.0  # seconds spent before a resume, by the epochs restored from a checkpoint

    def __init_subclass__(cls, **kwargs):
        """Every attack's `poison` checks its inputs first (_check_inputs): the one place for it."""
        super().__init_subclass__(**kwargs)
        check_inputs_first(cls, ("poison",))

    def _check_inputs(self, x, y, x_val, y_val, model=None):
        """x, once poison()'s data is checked: ValueError (TypeError) naming what is wrong, before any work: D_tr and
        D_v as data.check_points checks a dataset (lengths, NaN, labels that are class indices of the attack's
        `num_classes`), in the pixel range the attack clamps its poisons to (`pixel_range`: 0-255 images were
        taken for images in [-1, 1] and poisons came back near-black), and D_v given whole or not at all."""
        if (x_val is None) != (y_val is None):
            raise ValueError("pass the attacker's D_v as both x_val and y_val, or neither (without it the attack "
                             "holds out a part of x as its D_v)")
        classes = getattr(self, "num_classes", NUM_CLASSES)
        pixels = getattr(self, "pixel_range", None)  # None: an attack that moves no pixel (label flip) keeps them
        check_points(x, y, "training", classes, pixels)
        if x_val is not None:
            check_points(x_val, y_val, "attacker's validation", classes, pixels)
        if pixels is not None and pixels[0] < 0 <= float(x.min()):
            warnings.warn(f"the training images range over [{float(x.min()):.3g}, {float(x.max()):.3g}] but the attack "
                          f"keeps its poisons in pixel_range [{pixels[0]:g}, {pixels[1]:g}]: images in [0, 1] get "
                          "poisons with negative pixels; pass pixel_range=(0, 1) (or scale the images to [-1, 1])",
                          stacklevel=3)
        defender = getattr(self, "defender", None)
        if isinstance(defender, torch.nn.Module):
            labels = int(y.max() if y_val is None else max(y.max(), y_val.max())) + 1
            check_defender(defender, x, labels, self.differentiates_defender)
        return x

    def _check_params(self):
        """Raises ValueError naming the first parameter that is out of range. Subclasses extend it."""
        poison_budget(1, self.epsilon)  # epsilon in [0, 1]
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def _check_counts(self, *names, minimum=0):
        """Raises ValueError unless each named parameter is an integer of at least `minimum` (0 or 1)."""
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                kind = "non-negative" if minimum == 0 else "positive"
                raise ValueError(f"{name} must be a {kind} integer, got {value!r}")

    def _project(self, x, y):
        """x projected onto the feasible set of its labels y (`feasible_`, attacks/feasible.py, made by `poison` in
        the attacks that optimise pixels), or clamped to `pixel_range` where there is none."""
        feasible = getattr(self, "feasible_", None)
        return x.clamp(*self.pixel_range) if feasible is None else feasible.project(x, y)

    def _craft_sources(self, n):
        """D_p^0 for a training set of n points: sets and returns `source_indices_`; an attack that crafts
        poisons needs at least one."""
        self.source_indices_ = poison_sources(n, self.epsilon, self.init, self.seed)
        if len(self.source_indices_) == 0:
            raise ValueError(f"epsilon={self.epsilon} of {n} training points leaves no poison to craft")
        return self.source_indices_

    def _defender_and_data(self, x, y, x_val, y_val):
        """(a copy of the defender, x, y, x_val, y_val on its device and dtype); without D_v, a seeded 30% of
        (x, y) serves as D_v, and the poisons are still epsilon * len(y) points of x (source_indices_ index x)."""
        if x_val is None or y_val is None:  # check_inputs_first refused one without the other, and unequal lengths
            _, _, x_val, y_val = split_train_val(x, y, seed=self.seed)
        model = copy.deepcopy(self.defender)
        ref = next(model.parameters())
        x, x_val = x.to(ref.device, ref.dtype), x_val.to(ref.device, ref.dtype)
        return model, x, y.to(ref.device), x_val, y_val.to(ref.device)

    @classmethod
    def check_config(cls, cfg):
        """Raises ValueError if settings of a run contradict each other for this attack (checked with every
        other setting, before any work); each setting alone is checked by its Setting."""

    @classmethod
    def unread_settings(cls, cfg):
        """The names of this attack's own settings that a run of `cfg` does not read (a recipe of its own): the
        command line notes them when given."""
        return ()

    @classmethod
    def check_data(cls, cfg, n_train, n_val):
        """Raises data.DataTooSmallError if a run's data, once loaded (n_train points of D_tr, n_val of the attacker's
        D_v), cannot serve its settings; the protocol asks before any training."""

    @classmethod
    def from_config(cls, cfg, *, defender=None, attacker=None, checkpoint=None, verbose=False):
        """The attack with the settings of a run (a resolved tgda_attack.config.Config)."""
        raise NotImplementedError

    def poison(self, x, y, *, x_val=None, y_val=None):
        raise NotImplementedError


def check_inputs_first(cls, names):
    """Wraps each method of `names` that `cls` defines itself so that it first calls self._check_inputs(x, y, x_val,
    y_val, model) with its arguments of those names (None where it has none) and goes on with the x that returns and
    the labels as int64 (int32 or uint8 class indices pass the checks; cross-entropy reads int64 only); a `model`
    given is left in the mode it was in, unless the method returns it (a training) (PoisoningAttack's poison,
    Defense's detect_poison and train: the one place every attack's and defense's data is checked, from
    __init_subclass__)."""
    for name in names:
        own = cls.__dict__.get(name)
        if own is not None and not getattr(own, "checks_inputs", False):
            setattr(cls, name, _checking_inputs(own))


def _checking_inputs(method):
    signature = inspect.signature(method)

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = bound.arguments
        given["x"] = self._check_inputs(given["x"], given["y"], given.get("x_val"), given.get("y_val"),
                                        given.get("model"))
        for labels in ("y", "y_val"):  # class indices of any integer type, as cross-entropy reads them (int64)
            if isinstance(given.get(labels), torch.Tensor):
                given[labels] = given[labels].long()
        model = given.get("model")
        if not isinstance(model, torch.nn.Module):
            return method(*bound.args, **bound.kwargs)
        restore = modes_restorer(model)
        try:
            result = method(*bound.args, **bound.kwargs)
        except BaseException:
            restore()
            raise
        if result is not model:  # a filter evaluated the caller's model: back in its mode; a training returns the
            restore()  # model it trained in the mode the training leaves (eval, as train_classifier)
        return result
    checked.checks_inputs = True
    return checked


def registry(*classes, base=None, kind="attack"):
    """{name: class} of the classes, checked: every class a named subclass of `base` (default PoisoningAttack;
    a tuple allowed), names unique, a setting two classes share declared by both alike. `kind` names them in
    the messages. The attack and the defense registries are both made by it."""
    base = base or PoisoningAttack
    out, seen = {}, {}
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, base)) or not cls.name:
            names = " or ".join(b.__name__ for b in (base if isinstance(base, tuple) else (base,)))
            raise TypeError(f"{cls!r} is not a named {names} subclass")
        if cls.name in out:
            raise ValueError(f"two {kind}s are named {cls.name!r}")
        for setting in cls.settings:
            if seen.setdefault(setting.name, setting) != setting:
                raise ValueError(f"{kind}s declare setting {setting.name!r} differently: {seen[setting.name]} and {setting}")
        out[cls.name] = cls
    return out


def registered_settings(classes):
    """The distinct settings the classes of a registry ({name: class}) declare, in registry order."""
    out = {}
    for cls in classes.values():
        for setting in cls.settings:
            out.setdefault(setting.name, setting)
    return tuple(out.values())


def fresh_model(model, seed):
    """A deepcopy of `model` with every module's parameters re-initialised (reset_parameters, in module
    order) under `seed`; the global random state is left as it was."""
    model = copy.deepcopy(model)
    ref = next(model.parameters(), None)
    devices = [ref.device] if ref is not None and ref.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module in model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    return model


class StopSignals:
    """While active, SIGINT and SIGTERM (in the main thread) only ask a resumable attack to stop at its next step
    boundary (TGDA's batch, Gradient Canceling's step), after saving its checkpoint; a second signal acts at once
    (the handlers before are restored)."""

    def __enter__(self):
        self.flag, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True
        for sig, handler in self.previous.items():  # a second signal is not deferred
            signal.signal(sig, handler)

    def requested(self, world):
        """Whether to stop now; with several processes, whether any of them was asked to (they stop together)."""
        if world == 1:
            return self.flag
        flag = torch.tensor([float(self.flag)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def kept_progress(path, settings, required):
    """The attack checkpoint at `path` (read by rundir.load_state, which checks its `required` entries), or None where
    there is none. `settings` is what the attack's trajectory depends on (a dict, stored in the checkpoint as
    "settings"): a checkpoint written under others is refused (RunFolderError naming them), since resuming it would
    mix two attacks' progress. The entry "start" holds digests of what the attack began from (the pretrained models,
    the data); a checkpoint written before it was recorded, or one without settings at all, is not compared on it."""
    if not path or not os.path.exists(path):
        return None
    state = load_state(path, required)
    recorded, settings = state.get("settings"), dict(settings)
    if isinstance(recorded, dict) and "start" not in recorded:  # written before the start was recorded
        settings.pop("start", None)
    if recorded is not None and recorded != settings:
        changed = sorted(k for k in settings if not isinstance(recorded, dict) or recorded.get(k) != settings[k])
        named = [k if k != "start" else "start (the pretrained models or the data it began from)" for k in changed]
        raise RunFolderError(f"{path} was written by an attack with other settings ({', '.join(named)}); it is resumed "
                             "only by the settings that wrote it: remove it to start afresh")
    return state


def check_defender(model, x, labels, gradients=True):
    """ValueError naming what makes `model` unfit to be attacked on images like x with class indices below `labels`:
    no parameters, none that requires grad where the attack differentiates through them (`gradients`; MetaPoison
    returned its sources unchanged, the others stopped inside torch), a forward that fails on the images, or an output
    that is not one score per class (a forward of two images in eval mode)."""
    params = list(model.parameters())
    if not params:
        raise ValueError("the defender has no parameters: an attack needs a model that training changes")
    if gradients and not any(p.requires_grad for p in params):
        raise ValueError("none of the defender's parameters requires grad (is it frozen?): the attack differentiates "
                         "the defender's training through them; call requires_grad_(True) on those it trains")
    probe = x[:2].to(params[0].device, params[0].dtype)  # two images: a layer of batch statistics needs more than one
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(probe)
    except RuntimeError as exc:
        raise ValueError(f"the defender cannot take the images (shape {list(x.shape[1:])}): its forward on "
                         f"{len(probe)} of them raised {str(exc).splitlines()[0]}") from exc
    if out.dim() != 2 or out.shape[0] != len(probe) or out.shape[1] < labels:
        raise ValueError(f"the defender outputs {list(out.shape[1:])} for one image, but the labels need "
                         f"{labels} class scores: give it an output layer of one score per class")
