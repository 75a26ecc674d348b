"""recsys_ccl: two-tower retrieval with a fused contrastive loss, from raw logs to gRPC."""

from recsys_ccl.losses import (
    bpr_loss,
    contrastive_loss,
    cosine_contrastive_loss,
    margin_contrastive_loss,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "bpr_loss",
    "contrastive_loss",
    "cosine_contrastive_loss",
    "margin_contrastive_loss",
]
