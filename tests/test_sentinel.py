"""Redis Sentinel: a run on a sentinel URL follows a failover of its primary.

A primary, a replica and one sentinel, as real processes on loopback TCP ports
chosen free at run time. The primary is SIGKILLed mid-run; the sentinel promotes
the replica. The rule: the run exits 0 with the exact output and state, or exits
non-zero with one clear line, and then a ``resume`` on the same URL is exact.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
import redis

from bench.generate import generate
from orchestrator import Dataflow, run_main
from orchestrator.embedded import redis_server_binary
from orchestrator.errors import RedisUrlError
from orchestrator.recovery import RedisRecoveryConfig
from orchestrator.sentinel import parse_sentinel_url
from orchestrator.server import client_for

from conftest import REPO, cli_env, new_namespace, run_cli
from helpers import committed_epoch, committed_states, merge_outputs
from reference import reference_run

SERVICE = "pipeline"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def answers(port: int, password: str | None = None) -> bool:
    client = redis.Redis(port=port, password=password, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class SentinelSetup:
    """A primary, its replica and one sentinel monitoring them (quorum 1, fast failover)."""

    def __init__(
        self, directory: str, *, password: str | None = None, sentinel_password: str | None = None
    ) -> None:
        self.directory = directory
        self.primary, self.replica, self.sentinel = free_port(), free_port(), free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.password, self.sentinel_password = password, sentinel_password
        auth = f":{password}@" if password else ""
        query = f"?sentinel_password={sentinel_password}" if sentinel_password else ""
        self.url = f"redis+sentinel://{auth}127.0.0.1:{self.sentinel}/{SERVICE}{query}"

    def _start(self, name: str, args: list[str]) -> None:
        os.makedirs(os.path.join(self.directory, name), exist_ok=True)
        self.procs[name] = subprocess.Popen(
            [redis_server_binary(), *args, "--dir", os.path.join(self.directory, name),
             "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self) -> SentinelSetup:
        node = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                "--appendfsync", "always"]  # fmt: skip
        if self.password:
            node += ["--requirepass", self.password, "--masterauth", self.password]
        self._start("primary", ["--port", str(self.primary), *node])
        self._start(
            "replica",
            ["--port", str(self.replica), *node, "--replicaof", "127.0.0.1", str(self.primary)],
        )
        conf = os.path.join(self.directory, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {self.sentinel}\nbind 127.0.0.1\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} 500\n"
                f"sentinel failover-timeout {SERVICE} 3000\n"
            )
            if self.password:
                f.write(f"sentinel auth-pass {SERVICE} {self.password}\n")
            if self.sentinel_password:
                f.write(f"requirepass {self.sentinel_password}\n")
        self._start("sentinel", [conf, "--sentinel"])
        for port, password in [
            (self.primary, self.password),
            (self.replica, self.password),
            (self.sentinel, self.sentinel_password),
        ]:
            wait_until(lambda p=port, w=password: answers(p, w), 15, f"redis on port {port}")
        sentinel = redis.Redis(
            port=self.sentinel, password=self.sentinel_password, decode_responses=True
        )
        # the sentinel must know the replica before it can promote it
        wait_until(
            lambda: any(
                r["flags"] == "slave" and r["master-link-status"] == "ok"
                for r in sentinel.sentinel_slaves(SERVICE)
            ),
            20,
            "the sentinel to see the replica",
        )
        sentinel.close()
        return self

    def kill_primary(self) -> None:
        self.procs["primary"].kill()
        self.procs["primary"].wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    tmp = tempfile.mkdtemp(prefix="orchestrator-sentinel-")
    setup = SentinelSetup(tmp)
    try:
        yield setup.start()
    finally:
        setup.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.slow
def test_sentinel_and_primary_passwords(tmp_path):
    """Both passwords are used, and neither is printed, even when one is wrong."""
    setup = SentinelSetup(str(tmp_path), password="prim-PW", sentinel_password="sent-PW")
    try:
        setup.start()
        ok = run_cli("status", "--redis-url", setup.url, cwd=REPO)
        wrong_sentinel = run_cli(
            "status", "--redis-url", setup.url.replace("sent-PW", "sent-PWx"), cwd=REPO
        )
        wrong_primary = run_cli(
            "status", "--redis-url", setup.url.replace("prim-PW", "prim-PWx"), cwd=REPO
        )
    finally:
        setup.stop()
    assert ok.returncode == 0, ok.stderr
    assert "redis+sentinel://***@127.0.0.1:" in ok.stdout
    assert "sentinel_password=***" in ok.stdout
    for run in (wrong_sentinel, wrong_primary):
        assert run.returncode == 3, run.stderr
        assert run.stderr.startswith("orchestrator: cannot reach Redis at redis+sentinel://***@")
        assert len(run.stderr.splitlines()) == 1
        assert len(run.stderr) < 300
    assert "no sentinel at 127.0.0.1:" in wrong_sentinel.stderr
    assert "AuthenticationError" in wrong_sentinel.stderr
    for run in (ok, wrong_sentinel, wrong_primary):
        assert "PW" not in run.stdout + run.stderr


def test_sentinel_urls_parse():
    address = parse_sentinel_url(
        "redis+sentinel://u:p%40ss@h1:1,[::1]:2,h3/svc?db=3&sentinel_password=sp"
    )
    assert address.sentinels == (("h1", 1), ("::1", 2), ("h3", 26379))
    assert (address.service, address.db, address.username, address.password) == (
        "svc", 3, "u", "p@ss",
    )  # fmt: skip
    assert address.sentinel_password == "sp"
    assert parse_sentinel_url("redis+sentinel://h/s?password=q").password == "q"
    for bad, why in [
        ("redis+sentinel://h:1", "names one service"),
        ("redis+sentinel://h:1/s/t", "names one service"),
        ("redis+sentinel://h:x/s", "bad sentinel port"),
        ("redis+sentinel://:secret@h/s?dbb=1&password=secret", "unknown option(s) dbb"),
        ("redis+sentinel://h/s?db=one", "db must be a whole number"),
    ]:
        with pytest.raises(RedisUrlError, match="cannot use the Redis URL") as e:
            client_for(bad)
        assert why in str(e.value)
        assert "secret" not in str(e.value)


@pytest.mark.integration
@pytest.mark.slow
def test_run_follows_a_sentinel_failover(sentinel_setup, tmp_path):
    lines = list(generate(4_000, 300, seed=12))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    ns = new_namespace()
    args = ["--redis-url", sentinel_setup.url, "--namespace", ns, "--workers", "2"]
    first_out = tmp_path / "first.out"
    with open(first_out, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "ingest", str(path), *args,
             "--partitions", "3", "--flow", "tests.flows.slow_cart:flow", "--batch-events", "200"],
            cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while (
            before := committed_epoch(f"redis://127.0.0.1:{sentinel_setup.primary}/0", ns)
        ) < 800:
            assert time.monotonic() < deadline and driver.poll() is None, driver.stderr.read()
            time.sleep(0.02)
        assert before < len(lines) - 1  # the failover comes mid-run
        sentinel_setup.kill_primary()
        started = time.monotonic()
        _, stderr = driver.communicate(timeout=60)
    took = time.monotonic() - started
    print(f"failover at epoch {before}; the run ended {took:.1f}s later, exit {driver.returncode}")
    print(stderr)
    assert "Traceback" not in stderr
    # the sentinel promoted the replica, and the pipeline's data is there now
    promoted = redis.Redis(port=sentinel_setup.replica)
    assert promoted.info("replication")["role"] == "master"
    promoted.close()
    outputs = [first_out.read_text()]
    if driver.returncode != 0:
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("orchestrator: "), stderr
        resumed = run_cli("resume", str(path), *args, cwd=REPO, timeout=60)
        assert resumed.returncode == 0, resumed.stderr
        assert "Traceback" not in resumed.stderr
        outputs.append(resumed.stdout)
    expected_out, expected_states = reference_run(lines)
    merged = merge_outputs(*outputs)
    wrong = sum(
        a != b for a, b in zip(merged.splitlines(), expected_out.splitlines(), strict=False)
    )
    states = committed_states(f"redis://127.0.0.1:{sentinel_setup.replica}", ns)
    wrong_keys = sum(states.get(k) != v for k, v in expected_states.items())
    print(f"lines {len(merged.splitlines())}/{len(lines)}, {wrong} wrong; {wrong_keys} wrong keys")
    assert merged == expected_out
    assert states == expected_states

    # the query commands and run_main take the sentinel URL too, and reach the new primary
    status = run_cli("status", "--json", *args[:4], cwd=REPO)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["committed_epoch"] == len(lines) - 1
    assert "SENTINEL" in report["rq_worker_command"]
    user = json.loads(lines[-1])["user_id"]
    state = run_cli("state", user, "--json", *args[:4], cwd=REPO)
    assert state.returncode == 0, state.stderr
    assert json.loads(state.stdout)["state"] == expected_states[user]
    assert run_cli("dead-letters", *args[:4], cwd=REPO).returncode == 0
    flow = Dataflow()
    flow.stateful_map("sum", lambda key: 0, lambda total, x: (total + x, total + x))
    flow.capture()
    seen = []
    run_main(
        flow,
        lambda i, n: [(0, ("k", 2)), (1, ("k", 3))],
        lambda i, n: seen.append,
        recovery_config=RedisRecoveryConfig(sentinel_setup.url, namespace=new_namespace()),
    )
    assert seen == [(0, ("k", 2)), (1, ("k", 5))]
