"""The serve command's signal handlers, installed before anything heavy is imported or loaded.

SIGTERM/SIGINT ask for a graceful stop and SIGHUP for a reload; each only sets an event that
the serving loop reads, so a signal that arrives while torch is still importing or the bundle
is still loading neither kills the process (Python's default for SIGHUP) nor runs code in a
half-built server. Standard library only, so that installing it costs nothing.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

__all__ = ["ServerSignals"]


@dataclass
class ServerSignals:
    stop: threading.Event = field(default_factory=threading.Event)
    reload: threading.Event = field(default_factory=threading.Event)
    _previous: dict = field(default_factory=dict)

    @classmethod
    def install(cls) -> ServerSignals:
        """Take over SIGTERM, SIGINT and SIGHUP (main thread only) until `restore`."""
        sig = cls()
        for s in (signal.SIGTERM, signal.SIGINT):
            sig._previous[s] = signal.signal(s, lambda signum, frame: sig.stop.set())
        sig._previous[signal.SIGHUP] = signal.signal(
            signal.SIGHUP, lambda signum, frame: sig.reload.set())
        return sig

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
