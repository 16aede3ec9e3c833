"""Defenses against data poisoning, one module each behind one interface (base.PoisonFilter:
`detect_poison(x, y, ...) -> (report, is_clean)`, or base.RobustTraining: a training procedure that
replaces the retraining). DEFENSES is the registry the protocol and the command line read; a defense
is added by its module and one entry in the tuple below."""
from .base import Defense, PoisonFilter, RobustTraining, registry
from .centroid import SlabFilter, SphereFilter
from .influence import InfluenceFilter
from .loss import LossFilter
from .maxup import MaxUpTraining
from .sever import SeverFilter

DEFENSES = registry(LossFilter, SphereFilter, SlabFilter, InfluenceFilter, SeverFilter, MaxUpTraining)

__all__ = ["DEFENSES", "Defense", "InfluenceFilter", "LossFilter", "MaxUpTraining", "PoisonFilter", "RobustTraining", "SeverFilter", "SlabFilter",
           "SphereFilter"]
