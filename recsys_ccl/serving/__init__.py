"""gRPC serving of an exported bundle: loader, servicer, server, client."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys_ccl.serving.limits import ServerLimits

__all__ = ["BundleError", "LoadedBundle", "ServerLimits", "load_bundle"]

if TYPE_CHECKING:
    from recsys_ccl.serving.bundle import BundleError, LoadedBundle, load_bundle


def __getattr__(name: str):
    # the loader needs torch; `recsys-ccl --help` and the limits' defaults do not
    if name in ("BundleError", "LoadedBundle", "load_bundle"):
        from recsys_ccl.serving import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'recsys_ccl.serving' has no attribute {name!r}")
