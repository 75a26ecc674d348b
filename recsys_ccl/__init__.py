"""recsys_ccl: two-tower retrieval with a fused contrastive loss, from raw logs to gRPC."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "bpr_loss",
    "contrastive_loss",
    "cosine_contrastive_loss",
    "margin_contrastive_loss",
]

if TYPE_CHECKING:
    from recsys_ccl.losses import (
        bpr_loss,
        contrastive_loss,
        cosine_contrastive_loss,
        margin_contrastive_loss,
    )


def __getattr__(name: str):
    # The losses need torch (~200 MB resident); the data pipeline and the CLI's data commands
    # do not, so it is imported on first use only.
    if name in __all__:
        from recsys_ccl import losses

        return getattr(losses, name)
    raise AttributeError(f"module 'recsys_ccl' has no attribute {name!r}")
