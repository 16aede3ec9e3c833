"""Defenses against data poisoning, one module each behind one interface (base.PoisonFilter:
`detect_poison(x, y, ...) -> (report, is_clean)`, or base.RobustTraining: a training procedure that
replaces the retraining). DEFENSES is the registry the protocol and the command line read; a defense
is added by its module and one entry in the tuple below."""
from .base import Defense, PoisonFilter, RobustTraining, registry
from .centroid import SlabFilter, SphereFilter
from .loss import LossFilter
from .maxup import MaxUpTraining

DEFENSES = registry(LossFilter, SphereFilter, SlabFilter, MaxUpTraining)

__all__ = ["DEFENSES", "Defense", "LossFilter", "MaxUpTraining", "PoisonFilter", "RobustTraining", "SlabFilter",
           "SphereFilter"]
