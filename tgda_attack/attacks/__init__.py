"""Poisoning attacks, one module each, one interface: `attack.poison(x, y) -> (x_poison, y_poison)`
returns only the points to add to the training set."""
from .label_flip import LabelFlipAttack
from .tgda import TGDAAttack

ATTACKS = {"tgda": TGDAAttack, "label-flip": LabelFlipAttack}

__all__ = ["ATTACKS", "LabelFlipAttack", "TGDAAttack"]
