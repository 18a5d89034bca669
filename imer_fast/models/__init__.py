"""The seed systems as recovery-plus-classification models on imer_fast's fused layers."""
from .drkf import DRKF
from .feddisc import FedDISC, PseudoLabels
from .layers import IMPLEMENTATIONS, layer_set
from .mult_classifier import MulTClassifier
from .rohydr import RoHyDR

__all__ = ["DRKF", "FedDISC", "PseudoLabels", "MulTClassifier", "RoHyDR", "IMPLEMENTATIONS", "layer_set"]
