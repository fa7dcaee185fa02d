"""``--follow``: a run reads its file as it grows, like ``tail -F``.

A line is processed once its newline has arrived, wherever a writer cuts its writes; a
driver killed mid-way and resumed with ``resume --follow`` repeats and loses nothing; a
signal stops a followed run within 2 s with what it committed recorded; a file truncated
or replaced under the run ends it with one line and exit 66, after committing what was read.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.generate import generate

from conftest import REPO, cli_env, new_namespace, run_cli
from helpers import committed_epoch, committed_states
from reference import reference_run

pytestmark = pytest.mark.integration

LINES = 600
BAD_EPOCH = 500  # a line no flow accepts: under fail the followed run stops there

# Appends the chunks of DATA that CUTS delimit to PATH, flushed one by one, with pauses;
# waits for the file GO before the chunks at and after the index RESUME_AT.
WRITER = """
import json, os, random, sys, time
path, data_path, cuts, go, resume_at = sys.argv[1:6]
data, cuts, rng = open(data_path, "rb").read(), json.loads(cuts), random.Random(5)
for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
    if i == int(resume_at):
        while not os.path.exists(go):
            time.sleep(0.01)
    with open(path, "ab") as f:
        f.write(data[a:b])
    time.sleep(rng.choice([0, 0, 0.01, 0.03, 0.05, 0.3]))
"""


def final_file(with_bad: bool) -> bytes:
    """The file as the writer leaves it: every seventh line ends with \\r\\n."""
    lines = [line.encode() for line in generate(LINES, 40, seed=17)]
    if with_bad:
        lines.insert(BAD_EPOCH, b"FAIL HERE")
    return b"".join(line + (b"\r\n" if i % 7 == 0 else b"\n") for i, line in enumerate(lines))


def cut_points(data: bytes) -> list[int]:
    """Random places to cut the writes at: mid-line, between lines, between \\r and \\n."""
    rng = random.Random(3)
    cuts = set(rng.sample(range(1, len(data)), 120))
    crs = [i + 1 for i in range(len(data)) if data[i : i + 2] == b"\r\n"]
    cuts |= set(rng.sample(crs, 15))
    return [0, *sorted(cuts), len(data)]


def popen_cli(*args: str, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=REPO, env=cli_env(), stdout=stdout, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(predicate, timeout: float = 90.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def killed(proc: subprocess.Popen) -> None:
    """SIGKILL a process of the test's (if it still runs) and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def text_of(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["fail", "skip", "dead-letter"])
def test_a_followed_file_written_in_random_cuts_with_a_killed_driver_equals_one_clean_run(
    redis_url, tmp_path, on_error
):
    data = final_file(with_bad=True)
    cuts = cut_points(data)
    whole = data.decode().replace("\r\n", "\n").split("\n")[:-1]
    if on_error == "fail":
        expected, _ = reference_run(whole[:BAD_EPOCH])
    else:
        expected, _ = reference_run(whole, skip_bad=True)
    path, out, go = tmp_path / "events.json", tmp_path / "out.txt", tmp_path / "go"
    (tmp_path / "final").write_bytes(data)
    path.write_bytes(b"")
    ns = new_namespace()
    where = ["--redis-url", redis_url, "--namespace", ns]
    args = [*where, "--workers", "0", "--on-error", on_error, "--output", str(out), "--follow"]
    # A third of the way, the writer waits for the resumed driver: the bad line comes later.
    resume_at = len(cuts) // 3
    assert cuts[resume_at] < data.index(b"FAIL HERE")
    worker = popen_cli("worker", *where)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(tmp_path / "final"), json.dumps(cuts),
         str(go), str(resume_at)],
    )  # fmt: skip
    first = popen_cli("ingest", str(path), *args)
    resumed = None
    try:
        wait_for(lambda: text_of(out).count("\n") >= 20, what="the first output lines")
        first.kill()  # SIGKILL: nothing more is written or recorded
        first.communicate(timeout=30)
        resumed = popen_cli("resume", str(path), *args)
        go.touch()
        writer.wait(timeout=120)
        assert writer.returncode == 0
        if on_error == "fail":
            _, stderr = resumed.communicate(timeout=90)
            assert resumed.returncode == 65, stderr
            assert f"events.json:{BAD_EPOCH + 1} (epoch {BAD_EPOCH})" in stderr
        else:
            last = expected.splitlines(keepends=True)[-1]
            wait_for(lambda: text_of(out).endswith(last), what="the last epoch's line")
            resumed.send_signal(signal.SIGTERM)
            _, stderr = resumed.communicate(timeout=30)
            assert resumed.returncode == 130, stderr
        assert "Traceback" not in stderr
    finally:
        for proc in (first, resumed, writer, worker):
            if proc is not None:
                killed(proc)
    assert out.read_text() == expected
    if on_error == "fail":
        assert committed_epoch(redis_url, ns) == BAD_EPOCH - 1
    else:
        assert committed_states(redis_url, ns) == reference_run(whole, skip_bad=True)[1]
    if on_error == "dead-letter":
        listed = run_cli("dead-letters", "--json", *where, cwd=REPO)
        assert [json.loads(x)["epoch"] for x in listed.stdout.splitlines()] == [BAD_EPOCH]


@pytest.fixture
def followed(redis_url, tmp_path):
    """A followed ingest of a three-line file, with its first output written."""
    lines = list(generate(3, 2, seed=1))
    path, out = tmp_path / "events.json", tmp_path / "out.txt"
    path.write_text("".join(x + "\n" for x in lines))
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "1", "--output", str(out)]
    proc = popen_cli("ingest", str(path), *args, "--follow")
    try:
        wait_for(lambda: text_of(out).count("\n") == 3, what="the first three lines")
        yield proc, path, out, ns, args, lines
    finally:
        killed(proc)


def test_sigterm_stops_a_followed_run_within_2_s_with_its_committed_epoch_recorded(
    followed, redis_url
):
    proc, path, out, ns, args, lines = followed
    more = list(generate(6, 2, seed=1))[3:]
    with open(path, "a") as f:
        f.write(more[0] + "\n" + more[1][:10])  # one line more, and half of the next
    wait_for(lambda: text_of(out).count("\n") == 4, what="the appended line's output")
    time.sleep(0.3)  # the half line must not be processed however long it waits
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 2.0
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == (
        f"orchestrator: interrupted; committed epochs are kept: 'orchestrator resume {path} "
        f"--namespace {ns} --output {out} --follow' continues"
    )
    assert committed_epoch(redis_url, ns) == 3  # the half line is not committed

    with open(path, "a") as f:
        f.write(more[1][10:] + "\n" + more[2] + "\n")
    resumed = run_cli("resume", str(path), *args, cwd=REPO)  # not followed: ends at the end
    assert resumed.returncode == 0, resumed.stderr
    expected, _ = reference_run([*lines, *more])
    assert out.read_text() == expected


@pytest.mark.parametrize("how", ["truncated", "replaced"])
def test_a_followed_file_truncated_or_replaced_ends_the_run_with_exit_66(followed, redis_url, how):
    proc, path, out, ns, _, lines = followed
    if how == "truncated":
        with open(path, "r+") as f:
            f.truncate(10)
    else:
        new = path.with_name("new.json")
        new.write_text(lines[0] + "\n")
        os.replace(new, path)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 66, stderr
    [line] = stderr.splitlines()
    assert line.startswith(f"orchestrator: {path} was {how} ")
    assert "while it was followed: stopped after epoch 2, everything read before is committed" in (
        line
    )
    assert committed_epoch(redis_url, ns) == 2
    assert out.read_text() == reference_run(lines)[0]
