"""A Redis password (URL userinfo or ``?password=``) is never printed, nor in a worker's argv."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from bench.generate import generate
from orchestrator.queries import rq_worker_command
from orchestrator.settings import redact_text, redact_url, url_secrets
from tasks.keys import Keys

from conftest import REPO, RedisServer, cli_env, new_namespace, run_cli

PASSWORD = "s3cr3t-Pa55"


class PasswordServer(RedisServer):
    """A test's own redis-server that requires a password."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.args += ["--requirepass", PASSWORD]
        self.url = f"unix://:{PASSWORD}@{self.socket}"  # (start() pings with it)


@pytest.fixture
def locked_redis(tmp_path) -> PasswordServer:
    server = PasswordServer(str(tmp_path)).start()
    yield server
    server.stop()


def test_redact_url_hides_every_password():
    cases = {
        "redis://:pw@h:6379/0": "redis://***@h:6379/0",
        "redis://user:pw@h/0?password=pw2&db=1": "redis://user:***@h/0?password=***&db=1",
        "rediss://h:1/0?db=1&Password=x": "rediss://h:1/0?db=1&Password=***",
        "unix://:a/b@/tmp/r.sock?db=0": "unix://***@/tmp/r.sock?db=0",
        "redis+sentinel://:pw@h1:1,h2:2/svc?db=2&sentinel_password=sp":
            "redis+sentinel://***@h1:1,h2:2/svc?db=2&sentinel_password=***",
        "redis://user@h:1": "redis://user@h:1",
        "unix:///tmp/r.sock": "unix:///tmp/r.sock",
    }  # fmt: skip
    for url, shown in cases.items():
        assert redact_url(url) == shown
    assert set(url_secrets("redis://:p%40ss@h/0?password=q+r")) == {"p%40ss", "p@ss", "q+r", "q r"}
    assert redact_text("auth p@ss failed", "redis://:p%40ss@h/0") == "auth *** failed"
    keys = Keys("ns")
    assert "$REDIS_URL" in rq_worker_command("redis://h/0?password=pw", keys, 2)
    assert "pw" not in rq_worker_command("redis://h/0?password=pw", keys, 2)


def worker_cmdlines(driver: subprocess.Popen) -> list[str]:
    children = psutil.Process(driver.pid).children(recursive=True)
    lines = []
    for child in children:
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "redis-server" not in " ".join(cmdline):
            lines.append(" ".join(cmdline))
    return lines


@pytest.mark.integration
@pytest.mark.parametrize("where", ["userinfo", "query"])
def test_password_never_printed_nor_in_worker_argv(locked_redis, tmp_path, where):
    url = (
        locked_redis.url
        if where == "userinfo"
        else f"unix://{locked_redis.socket}?db=0&password={PASSWORD}"
    )
    path = tmp_path / "events.json"
    path.write_text("\n".join(generate(3_000, 200, seed=3)) + "\n")
    ns = new_namespace()
    args = ["--redis-url", url, "--namespace", ns]
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", str(path), *args, "--workers", "2",
         "--flow", "tests.flows.slow_cart:flow", "--batch-events", "300", "--verbose"],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        labelled = []
        while len(labelled) < 2:  # until both workers show their own command line
            assert time.monotonic() < deadline and driver.poll() is None
            workers = worker_cmdlines(driver)
            # Never, not even in the moment after the fork: the driver masks what the user
            # typed before it forks its workers.
            assert not [c for c in workers if PASSWORD in c]
            labelled = [c for c in workers if "-m orchestrator worker" in c]
            time.sleep(0.01)
        assert PASSWORD not in " ".join(psutil.Process(driver.pid).cmdline())
        out, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 0, err
    assert PASSWORD not in out + err

    status = run_cli("status", *args, cwd=REPO)
    as_json = run_cli("status", "--json", *args, cwd=REPO)
    assert status.returncode == as_json.returncode == 0, status.stderr + as_json.stderr
    assert "***" in status.stdout
    report = json.loads(as_json.stdout)
    assert "***" in report["redis"]
    assert "$REDIS_URL" in report["rq_worker_command"]
    rescaled = run_cli("resume", str(path), *args, "--partitions", "7", cwd=REPO)
    assert rescaled.returncode == 0 and "rescaled namespace" in rescaled.stderr, rescaled.stderr
    bad_db = url.replace("?db=0", "?db=x") if "?" in url else url + "?db=x"
    failures = [
        run_cli("ingest", str(path), *args, cwd=REPO),  # refused: committed epochs
        run_cli("resume", str(path), *args, "--flow", "examples.running_sum:flow", cwd=REPO),
        run_cli("state", "nobody", "--at-epoch", "-5", *args, cwd=REPO),
        run_cli("status", "--redis-url", url.replace(PASSWORD, PASSWORD + "x"), cwd=REPO),
        run_cli("status", "--redis-url", bad_db, cwd=REPO),
        run_cli("status", "--redis-url", url.replace("unix:", "unx:"), cwd=REPO),
        run_cli("status", "--redis-url", url, "--namespace", "bad name!", cwd=REPO),
    ]
    for run in [status, as_json, rescaled, *failures]:
        assert PASSWORD not in run.stdout + run.stderr
    for run in failures:
        assert run.returncode != 0
        assert "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) >= 1
