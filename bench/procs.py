"""Watching a command's process tree: peak RSS and CPU time of each process."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field


@dataclass
class ProcessStats:
    """What one process of the tree used."""

    pid: int
    role: str
    peak_rss: int = 0
    cpu_seconds: float = 0.0


@dataclass
class TreeSampler:
    """Samples a process and its descendants every ``interval`` seconds until stopped.

    It reads /proc directly: the tree by each process's ``children`` lists, the
    peak RSS from the kernel's high-water mark (VmHWM, exact whatever the pace),
    CPU time from ``stat``. That is cheap enough for a pace that sees the worker
    processes of a short resume, which a psutil scan of every process on the
    machine is not (figures in docs/performance.md).
    """

    root: int
    interval: float = 0.04
    stats: dict[int, ProcessStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        parents = {self.root: 0}
        todo = [self.root]
        while todo:
            pid = todo.pop()
            for child in _children(pid):
                if child not in parents:
                    parents[child] = pid
                    todo.append(child)
        for pid, parent in parents.items():
            try:
                cmdline = _read(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")
                if not cmdline:  # a zombie: its figures were taken while it ran
                    continue
                cpu = _cpu_seconds(_read(pid, "stat"))
                rss = _peak_rss(_read(pid, "status"))
            except OSError:
                continue
            stats = self.stats.get(pid)
            if stats is None:
                stats = self.stats[pid] = ProcessStats(pid, "")
            # (a child caught between its fork and its exec looks like its parent)
            parent_role = self.stats[parent].role if parent in self.stats else ""
            stats.role = _role(cmdline, is_root=pid == self.root, parent_role=parent_role)
            stats.peak_rss = max(stats.peak_rss, rss)
            stats.cpu_seconds = max(stats.cpu_seconds, cpu)

    def by_role(self) -> dict[str, list[ProcessStats]]:
        """The sampled processes grouped by what they are."""
        groups: dict[str, list[ProcessStats]] = {}
        for s in self.stats.values():
            groups.setdefault(s.role, []).append(s)
        return groups


_TICKS = os.sysconf("SC_CLK_TCK")


def _read(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def _children(pid: int) -> list[int]:
    """Direct children of a process (each thread lists the ones it started)."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return found


def _cpu_seconds(stat: bytes) -> float:
    """User + system CPU seconds from /proc/<pid>/stat (fields after the command name)."""
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _peak_rss(status: bytes) -> int:
    """The process's peak resident set size so far (VmHWM), in bytes."""
    for line in status.splitlines():
        if line.startswith(b"VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _role(text: str, *, is_root: bool, parent_role: str) -> str:
    # Redis forks a child to rewrite its append-only file; its title varies.
    if parent_role in ("redis", "redis-rewrite") or "redis-aof-rewrite" in text:
        return "redis-rewrite"
    if "redis-server" in text:
        return "redis"
    if "bench.plain" in text:
        return "python"
    # The command's own worker processes are forked from it (same command line).
    return "driver" if is_root else "worker"


def run_sampled(args: list[str], **kwargs: object) -> tuple[float, TreeSampler, int]:
    """Run a command to its end; return (wall seconds, its sampled tree, exit status)."""
    started = time.monotonic()
    proc = subprocess.Popen(args, **kwargs)  # type: ignore[call-overload]
    with TreeSampler(proc.pid) as sampler:
        proc.wait()
    return time.monotonic() - started, sampler, proc.returncode
