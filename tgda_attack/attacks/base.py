"""The one interface every poisoning attack of tgda_attack implements, and the registry the protocol and
the command line read (in the style of the Adversarial Robustness Toolbox's PoisoningAttack).

An attack is built from its parameters, which are checked once, at construction (`_check_params`),
or from a run's settings (`from_config`), and then called as

    x_poison, y_poison = attack.poison(x, y, x_val=None, y_val=None)

with the same signature for every attack: (x, y) is D_tr, (x_val, y_val) the attacker's D_v where the
attack uses one. It returns only the points to add to the training set, |D_p| = floor(epsilon |D_tr|),
and sets `source_indices_`, the indices into D_tr of the clean points D_p^0 the poisons start from.

Adding an attack: one module under tgda_attack/attacks/ with a PoisoningAttack subclass, and its class
in the tuple of tgda_attack/attacks/__init__.py. The protocol and the CLI need no other change.
"""
from ..data import poison_budget, poison_sources

INITS = ("first", "random")  # D_p^0: the first epsilon*N points of D_tr (the paper's) or a seeded choice


class PoisoningAttack:
    """Base of the attacks. Subclasses set `name` (the registry key and --attack value) and
    `needs_attacker` when the protocol's first stage must pretrain an attacker network for them
    (as an autoencoder); `from_config` always receives the pretrained defender."""

    name = None
    needs_attacker = False

    def __init__(self, epsilon=0.03, *, init="first", seed=0):
        self.epsilon, self.init, self.seed = epsilon, init, seed
        self.source_indices_ = None
        self.history = []

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

    def _craft_sources(self, n):
        """D_p^0 for a training set of n points: sets and returns `source_indices_`; an attack that crafts
        poisons needs at least one."""
        self.source_indices_ = poison_sources(n, self.epsilon, self.init, self.seed)
        if len(self.source_indices_) == 0:
            raise ValueError(f"epsilon={self.epsilon} of {n} training points leaves no poison to craft")
        return self.source_indices_

    @classmethod
    def from_config(cls, cfg, *, defender=None, attacker=None, checkpoint=None, verbose=False):
        """The attack with the settings of a run (a resolved tgda_attack.config.Config)."""
        raise NotImplementedError

    def poison(self, x, y, *, x_val=None, y_val=None):
        raise NotImplementedError


def registry(*classes):
    """{name: class} of the attack classes, checked: every class a PoisoningAttack with a unique name."""
    out = {}
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, PoisoningAttack)) or not cls.name:
            raise TypeError(f"{cls!r} is not a named PoisoningAttack subclass")
        if cls.name in out:
            raise ValueError(f"two attacks are named {cls.name!r}")
        out[cls.name] = cls
    return out
