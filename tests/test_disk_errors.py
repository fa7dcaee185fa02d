"""Unit tests of what a failing disk becomes: OutputError for the output, a reason from redis.log."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from orchestrator.embedded import stop_reason
from orchestrator.errors import OutputError
from orchestrator.output import synced_length, write_lines


def _log(directory: Path, *warnings: str) -> None:
    head = "1:M 29 Nov 2026 06:27:41.054 * The server is now ready to accept connections\n"
    lines = [f"1:M 29 Nov 2026 06:27:41.447 # {w}\n" for w in warnings]
    (directory / "redis.log").write_text(head + "".join(lines))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_write_to_a_full_disk_is_an_output_error_naming_the_file():
    with open("/dev/full", "wb") as out:
        with pytest.raises(OutputError) as caught:
            write_lines(out, [b'0 {"a": 1}'])
        assert caught.value.errno == errno.ENOSPC and caught.value.disk_error
        assert (
            str(caught.value) == "cannot write the output file /dev/full: No space left on device"
        )
        out.raw.close()  # (what is still buffered cannot be flushed)


def test_a_failed_fsync_records_no_length(tmp_path):
    out = open(tmp_path / "out.txt", "wb")  # noqa: SIM115
    out.write(b"0 x\n")
    os.close(out.fileno())  # the descriptor is gone: flush and fsync fail (EBADF)
    with pytest.raises(OutputError):
        synced_length(out)
    with pytest.raises(OSError):
        out.close()


def test_a_reader_that_went_away_stays_a_broken_pipe():
    read, write = os.pipe()
    os.close(read)
    with open(write, "wb") as out:
        with pytest.raises(BrokenPipeError):
            write_lines(out, [b"0 x"] * 100_000)
        out.raw.close()


def test_a_short_write_of_the_append_only_file_is_no_space(tmp_path):
    _log(
        tmp_path,
        "Short write while writing to the AOF file: (nwritten=162623, expected=653499)",
        "Can't recover from AOF write error when the AOF fsync policy is 'always'. Exiting...",
    )
    stopped = stop_reason(tmp_path, 1)
    assert stopped.no_space
    assert str(stopped) == (
        f"the embedded redis-server stopped: no space left on device for its append-only file "
        f"in {tmp_path}"
    )


@pytest.mark.parametrize(
    ("error", "said", "no_space"),
    [
        ("No space left on device", "no space left on device", True),
        ("Disk quota exceeded", "no space left on device", True),
        ("Input/output error", "input/output error", False),
    ],
)
def test_a_failed_write_of_the_append_only_file_says_its_error(tmp_path, error, said, no_space):
    _log(tmp_path, f"Error writing to the AOF file: {error}")
    stopped = stop_reason(tmp_path, 1)
    assert stopped.no_space is no_space
    assert stopped.reason == f"{said} for its append-only file in {tmp_path}"


def test_another_exit_gives_the_last_warning_of_the_log(tmp_path):
    _log(tmp_path, "Error writing to the AOF file: No space left on device")  # a run before
    with open(tmp_path / "redis.log", "a") as log:
        log.write(
            "2:M 29 Nov 2026 07:00:00.000 # Fatal error loading the DB: Invalid argument. Exiting.\n"
        )
    stopped = stop_reason(tmp_path, 1, pid=2)
    assert not stopped.no_space
    assert stopped.reason == (
        "exit status 1: Fatal error loading the DB: Invalid argument. Exiting. "
        f"(see {tmp_path / 'redis.log'})"
    )


def test_a_killed_server_is_not_blamed_on_what_it_said_at_its_start(tmp_path):
    with open(tmp_path / "redis.log", "w") as log:
        log.write(
            "7:M 29 Nov 2026 07:00:00.000 # WARNING Memory overcommit must be enabled!\n"
            "7:M 29 Nov 2026 07:00:00.001 * Ready to accept connections\n"
        )
    stopped = stop_reason(tmp_path, -9, pid=7)
    assert not stopped.disk
    assert (
        stopped.reason == f"killed by signal 9: no reason in its log (see {tmp_path / 'redis.log'})"
    )
