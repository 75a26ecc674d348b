"""Combine concurrent Recommend calls into one matmul, without a batching delay.

Scoring one user against the catalogue streams the whole item matrix from memory; scoring 8
users streams it once for all 8, at a fraction of 8 times the cost. Calls wait
in one queue; each of `slots` compute threads takes everything queued (up to max_batch, oldest
first) and answers it in one pass, then takes the next batch. The first call of a quiet period
is scored at once, so no latency is added when there is nothing to combine.

All of the server's compute goes through here (other calls as plain functions via `run`), so at
most `slots` threads compute at a time (each with its share of BLAS threads) however many gRPC
handler threads wait. A waiting caller sleeps on its own event and is woken once, when its
answer is ready: a shared condition woke every waiting handler after each batch, and on 2 cores
those wake-ups (each taking the GIL) cost more than the scoring.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["CallCombiner"]

Q = TypeVar("Q")
A = TypeVar("A")


class _Pending(Generic[Q, A]):
    __slots__ = ("answer", "done", "error", "query", "thunk")

    def __init__(self, query: Q | None = None, thunk: Callable[[], A] | None = None):
        self.query = query
        self.thunk = thunk
        self.done = threading.Event()
        self.answer: A | None = None
        self.error: BaseException | None = None


class CallCombiner(Generic[Q, A]):
    def __init__(self, answer_many: Callable[[Sequence[Q]], Sequence[A]], slots: int,
                 max_batch: int, name: str = "recsys-ccl-compute"):
        self._answer_many = answer_many
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: deque[_Pending[Q, A]] = deque()
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
                         for i in range(slots)]
        for t in self._threads:
            t.start()

    def answer(self, query: Q) -> A:
        """Answer one query, possibly together with others queued at the same time."""
        return self._submit(_Pending(query=query))

    def run(self, thunk: Callable[[], A]) -> A:
        """Run a computation that is not combined, within the same compute slots."""
        return self._submit(_Pending(thunk=thunk))

    def close(self) -> None:
        """Let the compute threads finish what is queued, then end them."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _submit(self, mine: _Pending[Q, A]) -> A:
        with self._cond:
            if self._closed:
                raise RuntimeError("the call combiner is closed")
            self._queue.append(mine)
            self._cond.notify()  # one idle compute thread, if any
        mine.done.wait()
        if mine.error is not None:
            raise mine.error
        return mine.answer

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:  # closed and drained
                    return
                n = min(len(self._queue), self._max_batch)
                taken = [self._queue.popleft() for _ in range(n)]
            self._compute(taken)

    def _compute(self, taken: list[_Pending[Q, A]]) -> None:
        queries = [p for p in taken if p.thunk is None]
        if queries:
            _settle(queries, lambda: self._answer_many([p.query for p in queries]))
        for p in taken:
            if p.thunk is not None:
                _settle([p], lambda p=p: [p.thunk()])


def _settle(pending: list[_Pending], compute: Callable[[], Sequence]) -> None:
    """Store answers (or the error) on each pending call and wake its caller."""
    try:
        answers = compute()
        for p, a in zip(pending, answers, strict=True):
            p.answer = a
    except BaseException as exc:  # delivered to every caller it concerns
        for p in pending:
            p.error = exc
    for p in pending:
        p.done.set()
