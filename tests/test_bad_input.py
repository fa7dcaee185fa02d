"""Bad lines and rejected events, on many partitions: fail stops cleanly, skip leaves them out."""

import json

import pytest

from bench.generate import generate

from conftest import cli_env, new_namespace, run_cli, stderr_lines
from model import cart_model

pytestmark = pytest.mark.integration

BAD = {
    1000: "FAIL HERE",  # not JSON
    2500: json.dumps({"user_id": "u1", "type": "order"}),  # missing order_id
    4000: json.dumps({"user_id": "u7", "type": "refund", "order_id": 12}),  # unknown type
    5200: "",  # blank: skipped silently, keeps its epoch number
    6000: "[1, 2]",  # not an object
}


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    lines = list(generate(8_000, 500, seed=5))
    for epoch, text in sorted(BAD.items()):
        lines.insert(epoch, text)  # inserted, so that every generated event stays valid
    path = tmp_path_factory.mktemp("dirty") / "events.json"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def cli(*args, redis_url, ns, cwd):
    return run_cli(
        *args, "--redis-url", redis_url, "--namespace", ns, "--partitions", "8", "--workers", "2",
        cwd=cwd, env=cli_env(),
    )  # fmt: skip


def test_skip_leaves_out_exactly_the_bad_lines(dirty, redis_url, tmp_path):
    path, lines = dirty
    lines = list(lines)
    run = cli(
        "ingest",
        str(path),
        "--on-error",
        "skip",
        redis_url=redis_url,
        ns=new_namespace(),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == cart_model([x.encode() for x in lines]).output
    assert "skipped 4 bad lines (first: " in run.stderr
    assert f"{path}:1001 (epoch 1000): invalid JSON" in run.stderr


def test_fail_stops_at_each_bad_line_and_resume_continues_exactly(dirty, redis_url, tmp_path):
    _, lines = dirty
    lines = list(lines)
    path = tmp_path / "events.json"  # this test edits its input
    path.write_text("\n".join(lines) + "\n")
    ns = new_namespace()
    printed = ""
    stops = []
    command = "ingest"
    while True:
        run = cli(command, str(path), redis_url=redis_url, ns=ns, cwd=tmp_path)
        printed += run.stdout
        if run.returncode == 0:
            break
        assert run.returncode == 65, run.stderr
        messages = stderr_lines(run)
        assert len(messages) == 1, run.stderr  # (it said more once, under a loaded machine)
        stops.append(messages[0])
        message = messages[0]
        # Move past the bad line the way the seed does: fix the input (here, blank it out).
        epoch = int(message.split("(epoch ")[1].split(")")[0])
        lines[epoch] = ""
        path.write_text("\n".join(lines) + "\n")
        command = "resume"
    assert [s.split(": ")[1].split(" ")[0] for s in stops] == [
        f"{path}:{e + 1}" for e in (1000, 2500, 4000, 6000)
    ]
    assert "missing field 'order_id'" in stops[1]
    assert "unknown event type 'refund'" in stops[2]
    assert "not a JSON object (got array)" in stops[3]
    # Every epoch printed once, in order, as a run over the fixed file prints it.
    assert printed == cart_model([x.encode() for x in lines]).output
