"""gRPC serving of an exported bundle: loader, servicer, server, client."""

from recsys_ccl.serving.bundle import BundleError, LoadedBundle, load_bundle
from recsys_ccl.serving.limits import ServerLimits

__all__ = ["BundleError", "LoadedBundle", "ServerLimits", "load_bundle"]
