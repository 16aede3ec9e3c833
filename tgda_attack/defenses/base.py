"""The one interface every defense of tgda_attack implements, and the registry the protocol and the
command line read (in the style of the Adversarial Robustness Toolbox's PoisonFilteringDefence), for
the defenses of Section 5.6 of Lu, Kamath & Yu, "Indiscriminate Data Poisoning Attacks on Neural
Networks" (TMLR 2022) and the sanitisers of Koh, Steinhardt & Liang (2018).

A defense is one of two kinds:
- a filter (PoisonFilter) says which training points to keep,

      report, is_clean = defense.detect_poison(x, y, model=None, fit=None, x_val=None, y_val=None)

  with `model` a defender trained on (x, y) (filters that score points by a model's loss or gradients
  use it; they train one with `fit(x, y) -> model`, the protocol's retraining procedure, when it is not
  given, and Sever retrains with it between rounds), (x_val, y_val) the defender's own validation data
  where a filter needs some (influence). `is_clean` is a bool tensor over (x, y); the defender is then
  retrained on the points kept;
- a robust training procedure (RobustTraining) replaces the retraining itself:

      model = defense.train(model, x, y, epochs=, batch_size=, lr=, seed=, verbose=False, desc=,
                            max_grad_norm=, last_epochs=)

  (`last_epochs`, a training.LastEpochs, records the test accuracy after the last epochs: pass it on to
  train_classifier);

Adding a defense: one module under tgda_attack/defenses/ with a subclass of PoisonFilter or
RobustTraining, and its class in the tuple of tgda_attack/defenses/__init__.py. The settings it reads
(`settings`, a tuple of tgda_attack.attacks.base.Setting) become fields of
tgda_attack.config.DefenseConfig and options of `tgda-attack run|evaluate --defense NAME`.
"""
import torch

from ..attacks.base import Setting, check_inputs_first
from ..data import DataTooSmallError, check_points, smallest_share
from ..attacks.base import registry as _registry

KINDS = ("filter", "training")

# The share of the training set a filter removes: the paper's 3% for every filter (Section 5.6).
FRACTION = Setting("defense_fraction", float, 0.03, "open-fraction",
                   "share of the (poisoned) training set a filter removes (the paper: 3%)")


class Defense:
    """Base of the defenses. Subclasses set `name` (the registry key and --defense value) and `kind`."""

    name = None
    kind = None
    settings = ()  # Setting(...) for each setting this defense reads
    validates = False  # whether it reads the defender's validation set (x_val, y_val of detect_poison)
    quick = {}  # DefenseConfig values that make it take seconds (the tests, `bench --scale smoke`)

    pixel_range = None  # the pixel range a defense that makes images (MaxUp's noisy copies) clamps to

    def __init_subclass__(cls, **kwargs):
        """Every defense's detect_poison and train check their data first (_check_inputs): the one place for it."""
        super().__init_subclass__(**kwargs)
        check_inputs_first(cls, ("detect_poison", "train"))

    def _check_inputs(self, x, y, x_val=None, y_val=None, model=None):
        """x once checked, in the floating dtype of the `model` given (the attacks cast their data so; a float64 x
        beside a float32 model was torch's "mat1 and mat2 must have the same dtype"): ValueError (TypeError) naming
        what is wrong, before any work (data.check_points: lengths, NaN pixels, labels that are class indices; the
        pixel range where the defense makes images of its own)."""
        if isinstance(x, torch.Tensor) and not x.is_floating_point():
            raise ValueError(f"the training images are {x.dtype}; a defense reads floating-point images in the data's "
                             "[-1, 1] range (uint8 images: x / 127.5 - 1)")
        check_points(x, y, "training", pixel_range=self.pixel_range)
        if x_val is not None and y_val is not None:
            check_points(x_val, y_val, "defender's validation", pixel_range=self.pixel_range)
        return in_dtype_of(model, x) if isinstance(model, torch.nn.Module) else x

    def _check_params(self):
        """Raises ValueError naming the first parameter out of range. Subclasses extend it."""

    def check_size(self, n):
        """Raises DataTooSmallError if the defense would do nothing on a training set of n points (a filter whose
        share rounds to no point); called before any training, so that a run does not report an undefended
        retraining under the defense's name."""

    @classmethod
    def from_config(cls, dcfg):
        """The defense with the settings of a tgda_attack.config.DefenseConfig: each Setting named
        `<prefix>_<arg>` (or defense_fraction) is passed as the constructor's keyword `<arg>`."""
        kwargs = {s.name.split("_", 1)[1]: getattr(dcfg, s.name) for s in cls.settings}
        return cls(**kwargs)


class PoisonFilter(Defense):
    kind = "filter"
    uses_model = False  # whether detect_poison scores points with a defender trained on (x, y)

    def __init__(self, fraction=0.03):
        self.fraction = fraction
        self._check_params()

    def _check_params(self):
        if not isinstance(self.fraction, (int, float)) or isinstance(self.fraction, bool) or not 0 < self.fraction < 1:
            raise ValueError(f"fraction is the share of the training set a filter removes, in (0, 1); got {self.fraction!r}")

    def points_removed(self, n):
        """floor(fraction * n): how many of n training points the filter removes in all."""
        return int(self.fraction * n + 1e-9)

    def check_size(self, n):
        if self.points_removed(n) < 1:
            raise DataTooSmallError(f"--defense-fraction {self.fraction} of {n} training points removes no point, so "
                                    f"the {self.name} defense would change nothing: use a fraction of at least "
                                    f"{smallest_share(n):g}")

    def _check_inputs(self, x, y, x_val=None, y_val=None, model=None):
        x = super()._check_inputs(x, y, x_val, y_val, model)
        PoisonFilter.check_size(self, len(y))  # a share of x that rounds to no point removed nothing, without a word
        return x  # (the share alone: Sever's rounds beyond it remove nothing here, refused only before a run)

    def _model(self, x, y, model, fit):
        """The model the filter scores (x, y) with: `model`, or the one fit(x, y) trains; and x in its dtype (a fit
        that returns a float32 model for float64 images was torch's "mat1 and mat2 must have the same dtype")."""
        if model is None and fit is None:
            raise ValueError(f"the {self.name} filter scores points with a defender trained on (x, y): pass model= or fit=")
        model = model if model is not None else fit(x, y)
        return model, in_dtype_of(model, x)

    def detect_poison(self, x, y, *, model=None, fit=None, x_val=None, y_val=None):
        """(report, is_clean): a dict of what the filter did, and a bool tensor, True for the points kept."""
        raise NotImplementedError


class RobustTraining(Defense):
    kind = "training"

    def train(self, model, x, y, *, epochs, batch_size, lr, seed, verbose=False, desc="robust training",
              max_grad_norm=0.0, last_epochs=None):
        """The model trained on (x, y) by this procedure (train_classifier's arguments; `last_epochs`, a
        training.LastEpochs, records the last epochs' test accuracy)."""
        raise NotImplementedError


def keep_all_but_largest(scores, fraction):
    """is_clean for the filter that removes the floor(fraction * n) points of largest score (ties broken
    by index, so the result is deterministic); a non-finite score counts as the largest."""
    scores = torch.as_tensor(scores).detach().double().cpu()
    if scores.dim() != 1:
        raise ValueError(f"scores must be one number a point, got shape {list(scores.shape)}")
    n_remove = int(fraction * len(scores) + 1e-9)  # PoisonFilter.points_removed
    scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("inf")))
    order = torch.sort(scores, descending=True, stable=True).indices
    is_clean = torch.ones(len(scores), dtype=torch.bool)
    is_clean[order[:n_remove]] = False
    return is_clean


def registry(*classes):
    """{name: class} of the defense classes, checked as the attacks' are (attacks.base.registry)."""
    return _registry(*classes, base=(PoisonFilter, RobustTraining), kind="defense")


def in_dtype_of(model, x):
    """x (None stays None) in the floating dtype of `model`'s parameters, where it has floating ones."""
    ref = next(model.parameters(), None)
    return x.to(ref.dtype) if x is not None and ref is not None and ref.is_floating_point() else x
