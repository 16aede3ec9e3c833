"""Poisoning attacks, one module each behind one interface (base.PoisoningAttack):
`attack.poison(x, y, *, x_val=None, y_val=None) -> (x_poison, y_poison)` returns only the points to add
to the training set. ATTACKS is the registry the protocol and the command line read; an attack is
added by its module and one entry in the tuple below."""
from .base import PoisoningAttack, registry
from .back_gradient import BackGradientAttack
from .emn import ErrorMinimizingNoiseAttack
from .gradient_canceling import GradientCancelingAttack
from .label_flip import FLIP_RULES, LabelFlipAttack
from .metapoison import MetaPoisonAttack
from .min_max import ImprovedMinMaxAttack, MinMaxAttack
from .tgda import TGDAAttack

ATTACKS = registry(TGDAAttack, LabelFlipAttack, GradientCancelingAttack, ErrorMinimizingNoiseAttack, MinMaxAttack, ImprovedMinMaxAttack, BackGradientAttack, MetaPoisonAttack)

__all__ = ["ATTACKS", "BackGradientAttack", "ErrorMinimizingNoiseAttack", "FLIP_RULES", "GradientCancelingAttack", "ImprovedMinMaxAttack", "LabelFlipAttack", "MetaPoisonAttack", "MinMaxAttack", "PoisoningAttack", "TGDAAttack"]
