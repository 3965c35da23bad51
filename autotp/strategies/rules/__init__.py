"""Per-op sharding rules; importing this package fills the registry."""
from autotp.strategies.rules import (  # noqa: F401
    attention,
    conv,
    embedding,
    indexing,
    inplace,
    linalg,
    loss,
    matmul,
    misc,
    norm,
    pointwise,
    random,
    reduction,
    routing,
    scan,
    view,
)
from autotp.strategies.rules.registry import RULES, LocalContext, OpContext, OpStrategy, Rule, lookup, register

__all__ = ["RULES", "LocalContext", "OpContext", "OpStrategy", "Rule", "lookup", "register"]
