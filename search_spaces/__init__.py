"""Search spaces for BN-NAS: ops registry, spaces as data, supernet, subnets, costs."""

from . import builtin  # noqa: F401  (registers the built-in spaces)
from .costs import CostTables, cost_tables, count_model
from .network import (TRAIN_MODES, Subnet, Supernet, arch_score, arch_scores, bn_indicator,
                      build_subnet, freeze, subnet_state_from_supernet)
from .ops import IDENTITY, OPS, OpError, create_op, last_bn, register_op
from .space import (Arch, ArchitectureError, Head, Layer, SearchSpace, SpaceError, Stage, StemLayer,
                    get_space, list_spaces, load_space_yaml, register_space, space_from_dict)

__all__ = [
    "Arch", "ArchitectureError", "CostTables", "Head", "IDENTITY", "Layer", "OPS", "OpError",
    "SearchSpace", "SpaceError", "Stage", "StemLayer", "Subnet", "Supernet", "TRAIN_MODES",
    "arch_score", "arch_scores", "bn_indicator", "build_subnet", "cost_tables", "count_model",
    "create_op", "freeze", "get_space", "last_bn", "list_spaces", "load_space_yaml",
    "register_op", "register_space", "space_from_dict", "subnet_state_from_supernet",
]
