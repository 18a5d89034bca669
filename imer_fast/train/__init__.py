"""Training loops of the imer_fast models (``imer-fast train``)."""
from .dgn import DGNConfig, evaluate_dgn, train_dgn

__all__ = ["DGNConfig", "evaluate_dgn", "train_dgn"]
