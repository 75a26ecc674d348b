"""recsys_ccl: two-tower retrieval with a fused contrastive loss, from raw logs to gRPC."""

__version__ = "0.1.0"

__all__ = ["__version__"]
