"""imer_fast modules: drop-in replacements for the release modules on imer_fast's fused operators."""
from .conv import GraphConv, RGCNConv
from .dialogue_graph_network import DialogueGraphNetwork, GraphNetwork, MatchingAttention

__all__ = ["DialogueGraphNetwork", "GraphConv", "GraphNetwork", "MatchingAttention", "RGCNConv"]
