"""imer_fast modules: drop-in replacements for the release modules on imer_fast's fused operators."""
from .cond_cross_attention import CondCrossAttention, StableLayerNorm
from .conditional_unet import ConditionalUNet1d
from .conv import GraphConv, RGCNConv
from .cross_modal_transformer import CrossModalTransformer, CrossModalTransformerLayer, PackedMultiheadAttention
from .dit import DiT1d
from .dialogue_graph_network import DialogueGraphNetwork, GraphNetwork, MatchingAttention
from .fusion_encoder import FusionEncoder
from .rcan import rcan_refiner
from .score_net import ScoreNet

__all__ = ["CondCrossAttention", "ConditionalUNet1d", "CrossModalTransformer", "CrossModalTransformerLayer", "DialogueGraphNetwork", "DiT1d", "FusionEncoder", "rcan_refiner",
           "PackedMultiheadAttention", "StableLayerNorm", "GraphConv", "GraphNetwork", "MatchingAttention", "RGCNConv", "ScoreNet"]
