"""Watching a command's process tree: peak RSS and CPU time of each process."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class ProcessStats:
    """What one process of the tree used."""

    pid: int
    role: str
    peak_rss: int = 0
    cpu_seconds: float = 0.0


@dataclass
class TreeSampler:
    """Samples a process and its descendants every ``interval`` seconds until stopped."""

    root: int
    # Peak RSS is the kernel's high-water mark, exact at any interval; CPU times are
    # cumulative. A slow pace keeps the sampler's own CPU (it scans /proc) from taking
    # a share of the two cores the pipeline runs on: ~4% of a core at 50 ms.
    interval: float = 0.25
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
        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    cmdline = proc.cmdline()
                    parent = proc.ppid()
                rss = _peak_rss(proc.pid)
            except (psutil.Error, OSError):
                continue
            stats = self.stats.get(proc.pid)
            if stats is None:
                stats = self.stats[proc.pid] = ProcessStats(proc.pid, "")
            # (a child caught between its fork and its exec looks like its parent)
            parent_role = self.stats[parent].role if parent in self.stats else ""
            stats.role = _role(cmdline, is_root=proc.pid == self.root, parent_role=parent_role)
            stats.peak_rss = max(stats.peak_rss, rss)
            stats.cpu_seconds = max(stats.cpu_seconds, cpu.user + cpu.system)

    def by_role(self) -> dict[str, list[ProcessStats]]:
        """The sampled processes grouped by what they are."""
        groups: dict[str, list[ProcessStats]] = {}
        for s in self.stats.values():
            groups.setdefault(s.role, []).append(s)
        return groups


def _peak_rss(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _role(cmdline: list[str], *, is_root: bool, parent_role: str) -> str:
    text = " ".join(cmdline)
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
