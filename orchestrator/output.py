"""Merging the partitions' committed output lines into one stream in epoch order."""

from __future__ import annotations

import heapq
from collections import deque
from typing import TextIO


class OutputMerger:
    """Holds committed lines of each partition until every epoch before them is committed.

    Each partition's lines arrive in epoch order; a line is released once the
    namespace-wide committed epoch reaches it, so the output is in epoch order
    whatever the number of partitions and workers.
    """

    def __init__(self) -> None:
        self._queues: dict[int, deque[tuple[int, str]]] = {}
        self._heads: list[tuple[int, int]] = []  # (epoch of a partition's first line, partition)

    def add(self, partition: int, lines: list[tuple[int, str]]) -> None:
        """Add a partition's committed lines (in epoch order)."""
        if not lines:
            return
        queue = self._queues.setdefault(partition, deque())
        if not queue:
            heapq.heappush(self._heads, (lines[0][0], partition))
        queue.extend(lines)

    def pop_through(self, epoch: int) -> list[str]:
        """Remove and return, in epoch order, every line with an epoch <= ``epoch``."""
        out: list[str] = []
        heads = self._heads
        while heads and heads[0][0] <= epoch:
            _, p = heapq.heappop(heads)
            queue = self._queues[p]
            while queue and queue[0][0] <= epoch and (not heads or queue[0][0] <= heads[0][0]):
                out.append(queue.popleft()[1])
            if queue:
                heapq.heappush(heads, (queue[0][0], p))
        return out

    def drop_from(self, epoch: int) -> None:
        """Forget lines with an epoch >= ``epoch`` (a run that stops there will not print them)."""
        for queue in self._queues.values():
            while queue and queue[-1][0] >= epoch:
                queue.pop()
        self._heads = [(q[0][0], p) for p, q in self._queues.items() if q]
        heapq.heapify(self._heads)


def write_lines(out: TextIO, lines: list[str]) -> None:
    """Write lines and flush, so that they are out before the commit that follows them."""
    if lines:
        out.write("\n".join(lines))
        out.write("\n")
        out.flush()
