"""The batch mixer: a fraction ``p_2d`` of the batches are 2D, the rest multi-view.

Whether batch ``i`` is 2D is a pure function of ``(seed, rank, i)``, so the mix is
deterministic given the seed and the rank, and a resumed run can recompute how many batches
of each kind were consumed before step ``i`` (:meth:`BatchMixer.counts`) and fast-forward
both streams to exactly where they were.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from mvdiff.data.shards import make_seed

__all__ = ["BatchMixer"]


class BatchMixer:
    """Interleave multi-view and 2D batches; ``start`` is the index of the first batch."""

    def __init__(
        self,
        mv: Iterable[dict] | None,
        images_2d: Iterable[dict] | None,
        p_2d: float = 0.3,
        seed: int = 0,
        rank: int = 0,
        start: int = 0,
        fast_forward: bool = True,
    ):
        if mv is None and images_2d is None:
            raise ValueError("the mixer needs at least one data stream")
        if not 0.0 <= p_2d <= 1.0:
            raise ValueError(f"p_2d must be in [0, 1], got {p_2d}")
        # with only one kind of data the fraction is forced
        self.p_2d = 1.0 if mv is None else (0.0 if images_2d is None else p_2d)
        self.mv, self.images_2d = mv, images_2d
        self.seed, self.rank, self.start = seed, rank, start
        self.fast_forward = fast_forward
        self.index = start

    def is_2d(self, index: int) -> bool:
        if self.p_2d in (0.0, 1.0):
            return self.p_2d == 1.0
        return random.Random(make_seed("mix", self.seed, self.rank, index)).random() < self.p_2d

    def counts(self, stop: int) -> tuple[int, int]:
        """(multi-view batches, 2D batches) among batch indices ``[0, stop)``."""
        n_2d = sum(self.is_2d(i) for i in range(stop))
        return stop - n_2d, n_2d

    def __iter__(self) -> Iterator[dict]:
        mv = _endless(self.mv) if self.mv is not None else None
        d2 = _endless(self.images_2d) if self.images_2d is not None else None
        if self.fast_forward and self.start:
            n_mv, n_2d = self.counts(self.start)
            for _ in range(n_mv):
                next(mv)
            for _ in range(n_2d):
                next(d2)
        self.index = self.start
        while True:
            batch = next(d2) if self.is_2d(self.index) else next(mv)
            self.index += 1
            yield batch


def _endless(loader: Iterable[dict]) -> Iterator[dict]:
    """Iterate ``loader`` again and again (a finite loader restarts; an endless one never ends)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("a data stream yielded no batches (all samples skipped or too few)")
