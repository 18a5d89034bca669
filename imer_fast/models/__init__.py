"""The seed systems as recovery-plus-classification models on imer_fast's fused layers."""
from .feddisc import FedDISC, PseudoLabels
from .layers import IMPLEMENTATIONS, layer_set
from .mult_classifier import MulTClassifier

__all__ = ["FedDISC", "PseudoLabels", "MulTClassifier", "IMPLEMENTATIONS", "layer_set"]
