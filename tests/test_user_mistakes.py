"""Every common user mistake is one line on stderr and a documented exit status, never a traceback.

The table holds what a new user tried first (issue 13): resuming a pipe that was never
ingested, a Redis URL without a scheme or with a bad port, an --output that is a directory or in a
missing folder, a data directory on a read-only filesystem, gzip-compressed input, an
absurd partition count. Each row: the command (and what the directory holds first), the
exit status README.md documents, and a fragment of the one line.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.errors import ExitStatus

from conftest import SEED_INPUT, cli_env

pytestmark = pytest.mark.integration

INPUT = "cart-join.json"


def _can_mount_read_only() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "mount", "--bind", "/tmp", "/tmp"],
        capture_output=True,
    )
    return probe.returncode == 0


# Skipped on a developer machine that cannot mount; in CI (CI=true) it runs, and fails
# there if mounts are impossible, so that the refusal is never silently unproven.
needs_mount = pytest.mark.skipif(
    not os.environ.get("CI") and not _can_mount_read_only(),
    reason="needs root with mount namespaces (unshare -m, bind mounts)",
)


def ingested(cwd: Path) -> None:
    """A run with the embedded server: the directory then holds .orchestrator/."""
    run = _cli(["ingest", INPUT, "--on-error", "skip"], cwd)
    assert run.returncode == 0, run.stderr
    assert (cwd / ".orchestrator").is_dir()


def gzipped(cwd: Path) -> None:
    (cwd / f"{INPUT}.gz").write_bytes(gzip.compress(SEED_INPUT.read_bytes()))


def a_directory(cwd: Path) -> None:
    (cwd / "out").mkdir()


def nothing(cwd: Path) -> None:
    pass


def _cli(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=120, **kwargs,
    )  # fmt: skip


def piped(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`cat cart-join.json | orchestrator ARGS`: stdin is a pipe."""
    with subprocess.Popen(["cat", INPUT], cwd=cwd, stdout=subprocess.PIPE) as cat:
        run = _cli(args, cwd, stdin=cat.stdout)
        cat.stdout.close()
    return run


def plain(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return _cli(args, cwd, stdin=subprocess.DEVNULL)


def read_only(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The command with its directory (and so .orchestrator/) bind-mounted read-only, in a
    private mount namespace: the host's mounts are never touched."""
    remount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", remount, str(cwd),
         sys.executable, "-m", "orchestrator", *args],
        cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


USAGE, INPUT_OUTPUT = ExitStatus.USAGE, ExitStatus.NO_INPUT


def row(name, setup, how, args, status, fragment, marks=()):
    """A mistake: what the directory holds, how the command runs, its exit status and line."""
    return pytest.param(setup, how, args, status, fragment, id=name, marks=marks)


MISTAKES = [
    row("a pipe on resume of a namespace that has none", nothing, piped,
        ["resume", "/dev/stdin"], USAGE, "has no data in this Redis: start it with"),
    row("a Redis URL without a scheme", nothing, plain,
        ["ingest", INPUT, "--redis-url", "localhost:6379"], USAGE,
        "cannot use the Redis URL localhost:6379: it must start with redis://"),
    row("a Redis URL without a scheme (status, -u)", nothing, plain,
        ["status", "-u", "localhost:6379"], USAGE, "cannot use the Redis URL localhost:6379"),
    row("a port out of range", nothing, plain,
        ["status", "--redis-url", "redis://localhost:99999"], USAGE,
        "cannot use the Redis URL redis://localhost:99999"),
    row("a port that is not a number", nothing, plain,
        ["ingest", INPUT, "--redis-url", "redis://localhost:notaport"], USAGE,
        "cannot use the Redis URL redis://localhost:notaport"),
    row("--output naming a directory", a_directory, plain, ["ingest", INPUT, "--output", "out"],
        INPUT_OUTPUT, "cannot open the output file out: Is a directory"),
    row("--output in a missing folder", nothing, plain,
        ["ingest", INPUT, "--output", "missing/out.txt"], INPUT_OUTPUT,
        "cannot open the output file missing/out.txt: No such file or directory"),
    row("status on a read-only data directory", ingested, read_only, ["status"], INPUT_OUTPUT,
        ".orchestrator: read-only file system (the embedded server keeps its data there", needs_mount),
    row("resume on a read-only data directory", ingested, read_only,
        ["resume", INPUT, "--on-error", "skip"], INPUT_OUTPUT,
        ".orchestrator: read-only file system (the embedded server keeps its data there", needs_mount),
    row("gzip-compressed input", gzipped, plain, ["ingest", f"{INPUT}.gz"], INPUT_OUTPUT,
        f"gzip-compressed input: decompress it first (e.g. gunzip -k {INPUT}.gz)"),
    row("--partitions 100000", nothing, plain, ["ingest", INPUT, "--partitions", "100000"],
        USAGE,
        "argument --partitions: must be at most 4096: 100000 (see 'orchestrator ingest --help')"),
    row("a missing FILE", nothing, plain, ["resume"], USAGE,
        "the following arguments are required: FILE"),
    row("an unknown command", nothing, plain, ["injest", INPUT], USAGE,
        "argument COMMAND: invalid choice: 'injest'"),
]  # fmt: skip


@pytest.mark.parametrize(("setup", "how", "args", "status", "fragment"), MISTAKES)
def test_a_mistake_is_one_line_and_its_documented_exit_status(
    tmp_path, setup, how, args, status, fragment
):
    shutil.copy(SEED_INPUT, tmp_path / INPUT)
    setup(tmp_path)
    run = how(args, tmp_path)
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("orchestrator: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert run.returncode == status, (run.returncode, run.stderr)
