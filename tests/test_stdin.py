"""Standard input (``-``) and other pipes (``/dev/stdin``, a FIFO) as the input.

A run reads a pipe from its first byte; ``resume -`` is given the same input again,
skips the committed prefix while hashing every byte of it (sha256), and refuses an input
whose prefix differs (exit 66), so a killed run completes exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bench.generate import generate

from conftest import REPO, cli_env, new_namespace
from helpers import committed_epoch, committed_states
from reference import reference_run

pytestmark = pytest.mark.integration


def cli(*args: str, stdin=subprocess.DEVNULL, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=REPO, env=cli_env(), stdin=stdin, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def piped(path, *args: str) -> subprocess.CompletedProcess:
    """`cat PATH | orchestrator ARGS`."""
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as cat:
        run = cli(*args, stdin=cat.stdout)
        cat.stdout.close()
    return run


@pytest.fixture
def setup(redis_url, tmp_path):
    lines = list(generate(2_000, 50, seed=6))
    lines.insert(700, "FAIL HERE")
    path = tmp_path / "events.json"
    path.write_text("".join(x + "\n" for x in lines))
    ns = new_namespace()
    where = ["--redis-url", redis_url, "--namespace", ns]
    return path, lines, ns, [*where, "--workers", "1", "--on-error", "skip"]


def test_cat_f_into_ingest_dash_equals_ingest_f(setup, redis_url, tmp_path):
    path, lines, ns, args = setup
    from_pipe = piped(path, "ingest", "-", *args, "--output", str(tmp_path / "pipe.txt"))
    assert from_pipe.returncode == 0, from_pipe.stderr
    assert "-:701 (epoch 700): invalid JSON" in from_pipe.stderr
    other = [*args[:2], "--namespace", new_namespace(), *args[4:]]
    from_file = cli("ingest", str(path), *other, "--output", str(tmp_path / "file.txt"))
    assert from_file.returncode == 0, from_file.stderr
    expected, states = reference_run(lines, skip_bad=True)
    assert (tmp_path / "pipe.txt").read_text() == (tmp_path / "file.txt").read_text() == expected
    assert committed_states(redis_url, ns) == states


def test_a_killed_ingest_from_stdin_is_completed_exactly_by_cat_f_into_resume_dash(
    setup, redis_url, tmp_path
):
    path, lines, ns, args = setup
    out = tmp_path / "out.txt"
    data = path.read_bytes()
    half = data.index(b"\n", len(data) // 2) + 7  # mid-line: the rest never comes to this run
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", "-", *args, "--output", str(out)],
        cwd=REPO, env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        driver.stdin.write(data[:half])
        driver.stdin.flush()
        deadline = time.monotonic() + 60
        # Everything before the cut line is committed, though the pipe stays open: the run
        # does not wait for more lines to send on what it read.
        while committed_epoch(redis_url, ns) < data[:half].count(b"\n") - 1:
            assert time.monotonic() < deadline, "the lines read were not committed"
            time.sleep(0.02)
    finally:
        driver.kill()  # SIGKILL: nothing more is written or recorded
        driver.communicate(timeout=30)
    resumed = piped(path, "resume", "-", *args, "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr
    expected, states = reference_run(lines, skip_bad=True)
    assert out.read_text() == expected
    assert committed_states(redis_url, ns) == states


def test_resume_dash_refuses_a_different_prefix_with_exit_66(setup, tmp_path):
    path, lines, ns, args = setup
    half = tmp_path / "half.json"
    half.write_text("".join(x + "\n" for x in lines[:1000]))
    assert piped(half, "ingest", "-", *args).returncode == 0
    changed = tmp_path / "changed.json"
    swapped = [lines[1], lines[0], *lines[2:]]  # the same bytes, in another order
    changed.write_text("".join(x + "\n" for x in swapped))
    refused = piped(changed, "resume", "-", *args)
    assert refused.returncode == 66, refused.stderr
    [line] = refused.stderr.splitlines()
    assert line.startswith("orchestrator: - has changed before the resume point (its first ")
    first_line = tmp_path / "first.json"
    first_line.write_text(lines[0] + "\n")
    short = piped(first_line, "resume", "-", *args)
    assert short.returncode == 66, short.stderr
    assert "- ended after " in short.stderr and "before the committed position" in short.stderr


def test_a_fifo_and_dev_stdin_are_read_as_dash_is(setup, tmp_path):
    path, lines, ns, args = setup
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(path.read_bytes()[:50_000])

    writer = threading.Thread(target=feed)
    writer.start()
    first = cli("ingest", str(fifo), *args, "--output", str(tmp_path / "out.txt"))
    writer.join()
    assert first.returncode == 0, first.stderr
    rest = piped(path, "resume", "/dev/stdin", *args, "--output", str(tmp_path / "out.txt"))
    assert rest.returncode == 0, rest.stderr
    assert (tmp_path / "out.txt").read_text() == reference_run(lines, skip_bad=True)[0]


def test_sigterm_stops_a_run_waiting_on_stdin_with_exit_130(setup, redis_url):
    path, lines, ns, args = setup
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", "-", *args],
        cwd=REPO, env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        driver.stdin.write("".join(x + "\n" for x in lines[:10]))
        driver.stdin.flush()
        deadline = time.monotonic() + 60
        while committed_epoch(redis_url, ns) < 9:
            assert time.monotonic() < deadline, "the lines read were not committed"
            time.sleep(0.02)
        sent = time.monotonic()
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=30)
        assert time.monotonic() - sent < 2.0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate(timeout=30)
    assert driver.returncode == 130, stderr
    assert "'orchestrator resume - --namespace" in stderr.splitlines()[-1]


# --- PipeInput, the reader of a pipe -----------------------------------------------------


def a_pipe():
    from orchestrator.reader import PipeInput

    read, write = os.pipe()
    return PipeInput(read), write


def until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
    return value


def whole_line(pipe) -> bytes:
    """A whole line, or b"" after giving back what came of it (as the driver does)."""
    line = pipe.readline(100)
    if line.endswith(b"\n"):
        return line
    pipe.unread(line)
    return b""


def test_a_pipe_gives_a_line_only_in_part_until_its_newline_arrives():
    pipe, write = a_pipe()
    pipe.blocking = False
    os.write(write, b'{"a": 1}\n{"b"')
    assert until(lambda: pipe.readline(100)) == b'{"a": 1}\n'
    part = until(lambda: pipe.readline(100))
    assert part == b'{"b"'
    pipe.unread(part)  # the driver gives it back and waits
    os.write(write, b": 2}\n")
    assert until(lambda: whole_line(pipe)) == b'{"b": 2}\n'
    assert not pipe.ended
    os.write(write, b"end")
    os.close(write)
    assert until(lambda: pipe.readline(100)) == b"end"
    assert until(lambda: pipe.ended)
    assert pipe.position == len(b'{"a": 1}\n{"b": 2}\nend')


def test_a_pipe_hashes_every_byte_before_the_offset_asked_for():
    import hashlib

    pipe, write = a_pipe()
    data = b"".join(b"line %d\n" % i for i in range(50_000))  # several chunks
    feeder = threading.Thread(target=lambda: (os.write(write, data), os.close(write)))
    feeder.start()
    at = 0
    for cut in (0, 7, 70_000, 200_000, len(data)):
        while at < cut:
            at += len(pipe.readline())
        assert pipe.hash_at(cut) == hashlib.sha256(data[:cut]).hexdigest()
    feeder.join()


def test_the_rest_of_an_oversized_line_on_a_pipe_is_skipped_as_it_arrives():
    from orchestrator.reader import finish_oversized

    pipe, write = a_pipe()
    pipe.blocking = False
    os.write(write, b"x" * 30)
    start = until(lambda: pipe.readline(11))  # cut at the limit: the rest blocks till "\n"
    threading.Timer(
        0.2, lambda: (os.write(write, b"y" * 10 + b"\nnext\n"), os.close(write))
    ).start()
    head, size, reason, ended = finish_oversized(pipe, start, 10)
    assert (head, size, ended) == (b"x" * 11, 41, True)
    assert "41 bytes, over the 10-byte limit" in reason
    assert until(lambda: pipe.readline(11)) == b"next\n"
