"""Per-op sharding rules; importing this package fills the registry."""
from autotp.strategies.rules.registry import RULES, LocalContext, OpContext, OpStrategy, Rule, lookup, register

__all__ = ["RULES", "LocalContext", "OpContext", "OpStrategy", "Rule", "lookup", "register"]
