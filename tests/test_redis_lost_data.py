"""Redis that comes back with less than it acknowledged, and drivers that wake up too late.

The rule every test here checks: each fault ends in the exact result (after a final
`resume`) or in a clear refusal — never in exit 0 with a wrong output or state.
"""

import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis

from bench.generate import generate
from orchestrator.embedded import redis_server_binary
from orchestrator.outcome import last_run
from tasks.keys import Keys

from conftest import REPO, cli_env, new_namespace, run_cli
from helpers import committed_epoch, committed_states, merge_outputs
from proxy import Proxy
from reference import reference_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLOW_FLOW = "tests.flows.slow_cart:flow"  # ~1 ms per event: a run lasts long enough to hit


def popen_cli(*args, stdout=subprocess.DEVNULL, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=REPO, env=env or cli_env(), stdout=stdout, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_committed(url, ns, epoch, driver, timeout=60):
    deadline = time.monotonic() + timeout
    while committed_epoch(url, ns) < epoch:
        assert driver.poll() is None, driver.communicate()[1]
        assert time.monotonic() < deadline, "the run did not get that far"
        time.sleep(0.01)


def one_line_error(stderr, *needles):
    errors = [
        x for x in stderr.splitlines() if x.startswith("orchestrator:") and "warning" not in x
    ]
    assert "Traceback" not in stderr, stderr
    assert any(all(n in x for n in needles) for x in errors), stderr


class TcpServer:
    """A redis-server of a test's own on a loopback TCP port (replication needs TCP)."""

    def __init__(self, directory, *extra):
        self.directory = directory
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", directory, "--logfile", "redis.log",
            *extra,
        ]  # fmt: skip
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                assert time.monotonic() < deadline and self.proc.poll() is None
                time.sleep(0.02)
        client.close()
        return self

    def client(self):
        return redis.Redis(port=self.port)

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def servers(tmp_path):
    started = []

    def make(name, *extra):
        directory = tmp_path / name
        directory.mkdir()
        server = TcpServer(str(directory), *extra)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def events(tmp_path):
    lines = list(generate(4_000, 300, seed=40))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def run_args(url, ns):
    return ["--redis-url", url, "--namespace", ns, "--workers", "2"]


def slow_ingest(path, url, ns, out, env=None):
    return popen_cli(
        "ingest", str(path), *run_args(url, ns), "--partitions", "3", "--flow", SLOW_FLOW,
        "--batch-events", "200", "--output", str(out), env=env,
    )  # fmt: skip


def assert_exact_after_resume(path, lines, url, ns, out, driver_stderr, driver_code):
    """The driver ended exact (0) or refused (3); a resume then gives the clean run's result."""
    assert driver_code in (0, 3), driver_stderr
    if driver_code == 3:
        one_line_error(driver_stderr, "Redis")
    resumed = run_cli("resume", str(path), *run_args(url, ns), "--output", str(out), cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    expected_out, expected_states = reference_run(lines)
    assert out.read_text() == expected_out
    assert committed_states(url, ns) == expected_states


def aof_path(directory):
    parts = sorted(glob.glob(os.path.join(directory, "appendonlydir", "*.incr.aof")))
    return parts[-1] if parts else os.path.join(directory, "appendonly.aof")


# Fractions of what the append-only file grew by during the run's second half.
@pytest.mark.parametrize("cut", [0.03, 0.15, 0.35, 0.6, 1.0])
def test_a_lost_append_only_tail_under_a_running_driver(own_redis, events, tmp_path, cut):
    path, lines = events
    ns, out = new_namespace(), tmp_path / "out.txt"
    driver = slow_ingest(path, own_redis.url, ns, out)
    wait_committed(own_redis.url, ns, 800, driver)
    aof = aof_path(own_redis.directory)
    mark = os.path.getsize(aof)
    wait_committed(own_redis.url, ns, 1_800, driver)
    own_redis.kill()  # the machine crashed; `appendfsync everysec` lost the file's tail
    size = os.path.getsize(aof)
    os.truncate(aof, size - int((size - mark) * cut))
    own_redis.start()
    _, stderr = driver.communicate(timeout=150)
    assert_exact_after_resume(path, lines, own_redis.url, ns, out, stderr, driver.returncode)


def test_a_failover_to_a_lagging_replica_behind_a_stable_address(servers, events, tmp_path):
    path, lines = events
    primary = servers("primary").start()
    link = Proxy(("127.0.0.1", primary.port))  # the replication link, which will lag
    replica = servers("replica", "--replicaof", "127.0.0.1", str(link.port)).start()
    front = Proxy(("127.0.0.1", primary.port))  # the address clients use
    try:
        deadline = time.monotonic() + 15
        while replica.client().info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        url, ns, out = f"redis://127.0.0.1:{front.port}/0", new_namespace(), tmp_path / "out.txt"
        driver = slow_ingest(path, url, ns, out)
        wait_committed(url, ns, 1_500, driver)
        link.dropping = True  # the replica falls behind...
        time.sleep(0.3)
        primary.kill()  # ...the primary dies, and the replica takes over its address
        replica.client().execute_command("REPLICAOF", "NO", "ONE")
        front.switch(("127.0.0.1", replica.port))
        _, stderr = driver.communicate(timeout=150)
        assert_exact_after_resume(path, lines, url, ns, out, stderr, driver.returncode)
    finally:
        front.close()
        link.close()


def test_a_redis_restarted_empty_is_detected_and_resume_refuses(servers, events, tmp_path):
    path, _ = events
    server = servers("volatile").start()  # appendonly no: a restart comes back empty
    ns, out = new_namespace(), tmp_path / "out.txt"
    driver = slow_ingest(path, server.url, ns, out)
    wait_committed(server.url, ns, 1_000, driver)
    server.kill()
    server.start()
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 3, stderr
    one_line_error(stderr, "is gone from Redis")
    written = out.read_bytes()
    resumed = run_cli(
        "resume", str(path), *run_args(server.url, ns), "--output", str(out), cwd=REPO
    )
    assert resumed.returncode == 2, resumed.stderr
    one_line_error(resumed.stderr, "has no data in this Redis", "ingest")
    assert out.read_bytes() == written  # nothing appended, nothing cut


def test_a_server_that_can_evict_keys_is_refused(servers, tmp_path):
    server = servers("lru", "--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru").start()
    path = tmp_path / "events.json"
    path.write_text("\n".join(generate(200, 20, seed=3)) + "\n")
    ns = new_namespace()
    refused = run_cli("ingest", str(path), *run_args(server.url, ns), cwd=REPO)
    assert refused.returncode == 2, refused.stderr
    one_line_error(refused.stderr, "maxmemory-policy allkeys-lru", "noeviction", "--allow-eviction")
    assert not server.client().exists(Keys(ns).meta)  # refused before anything was written
    allowed = run_cli("ingest", str(path), *run_args(server.url, ns), "--allow-eviction", cwd=REPO)
    assert allowed.returncode == 0, allowed.stderr
    assert "allowed by --allow-eviction" in allowed.stderr
    assert allowed.stdout == reference_run(path.read_text().splitlines())[0]


def test_resume_refuses_a_partition_that_lost_its_progress(redis_url, events, real):
    path, lines = events
    ns = new_namespace()
    head = path.with_name("head.json")
    head.write_text("\n".join(lines[:1_000]) + "\n")
    first = run_cli("ingest", str(head), *run_args(redis_url, ns), "--partitions", "3", cwd=REPO)
    assert first.returncode == 0, first.stderr
    real.delete(Keys(ns).progress(1))  # evicted, say
    resumed = run_cli("resume", str(path), *run_args(redis_url, ns), cwd=REPO)
    assert resumed.returncode == 3, resumed.stderr
    one_line_error(resumed.stderr, "Redis lost data", "partition 1", "replay")


@pytest.fixture
def short_lock():
    return cli_env(ORCHESTRATOR_DRIVER_LOCK_TTL="2")


@contextlib.contextmanager
def paused_past_its_lock(driver):
    """SIGSTOP a driver until its lock (2 s TTL) has expired; SIGCONT it on leaving."""
    os.kill(driver.pid, signal.SIGSTOP)
    try:
        time.sleep(3)
        yield
    finally:
        os.kill(driver.pid, signal.SIGCONT)


def test_a_driver_paused_past_its_lock_writes_nothing_when_it_wakes(
    own_redis, events, tmp_path, short_lock
):
    path, lines = events
    ns, out = new_namespace(), tmp_path / "out.txt"
    url = own_redis.url
    paused = slow_ingest(path, url, ns, out, env=short_lock)
    wait_committed(url, ns, 800, paused)
    with paused_past_its_lock(paused):
        # The paused driver still holds its output file: no other run may cut or write it.
        same_file = run_cli(
            "resume", str(path), *run_args(url, ns), "--output", str(out), cwd=REPO, env=short_lock
        )  # fmt: skip
        assert same_file.returncode == 75, same_file.stderr
        one_line_error(same_file.stderr, str(out), "in use by another process")
        other = run_cli("resume", str(path), *run_args(url, ns), cwd=REPO, env=short_lock)
        assert other.returncode == 0, other.stderr
        client = redis.Redis.from_url(url)
        keys = Keys(ns)
        before = [client.hgetall(keys.meta)] + [client.hgetall(keys.progress(p)) for p in range(3)]
    _, stderr = paused.communicate(timeout=60)
    assert paused.returncode == 75, stderr
    one_line_error(stderr, "another driver took over", "without writing anything more")
    after = [client.hgetall(keys.meta)] + [client.hgetall(keys.progress(p)) for p in range(3)]
    assert after == before  # the old driver wrote nothing
    # and the last run status shows is the one that took over, with its own figures
    shown = last_run(client, keys)
    assert (shown["command"], shown["exit_status"]) == ("resume", 0), shown
    assert shown["generation"] == int(after[0][b"generation"]), shown
    last = run_cli("resume", str(path), *run_args(url, ns), cwd=REPO, env=short_lock)
    assert last.returncode == 0 and last.stdout == "", last.stderr
    expected_out, expected_states = reference_run(lines)
    assert merge_outputs(out.read_text(), other.stdout) == expected_out
    assert committed_states(url, ns) == expected_states
    client.close()


def test_reset_under_a_paused_driver_stops_it_when_it_wakes(
    own_redis, events, tmp_path, short_lock
):
    path, _ = events
    ns, out = new_namespace(), tmp_path / "out.txt"
    url = own_redis.url
    paused = slow_ingest(path, url, ns, out, env=short_lock)
    wait_committed(url, ns, 500, paused)
    with paused_past_its_lock(paused):
        wiped = run_cli("reset", "--yes", "--redis-url", url, "--namespace", ns, cwd=REPO)
        assert wiped.returncode == 0, wiped.stderr
    _, stderr = paused.communicate(timeout=60)
    assert paused.returncode == 3, stderr
    one_line_error(stderr, "is gone from Redis")
    client = redis.Redis.from_url(url)
    time.sleep(1)
    assert [k for k in client.keys(f"{ns}:*") if not k.endswith(b":lease")] == []
    client.close()


def test_keys_evicted_under_allow_eviction_stop_the_run_and_every_later_resume(servers, events):
    path, lines = events
    server = servers("tight").start()
    client = server.client()
    client.mset({f"filler:{i}": b"x" * 1000 for i in range(3_000)})
    used = client.info("memory")["used_memory"]
    client.config_set("maxmemory", used + 50_000)  # the run's first writes push keys out
    client.config_set("maxmemory-policy", "allkeys-lru")
    ns = new_namespace()
    args = [*run_args(server.url, ns), "--allow-eviction"]
    run = run_cli("ingest", str(path), *args, cwd=REPO)
    assert run.returncode == 3, run.stderr
    one_line_error(run.stderr, "evicted", "keys during the run")
    client.config_set("maxmemory", 0)  # room again: still, nobody may build on what is left
    resumed = run_cli("resume", str(path), *args, cwd=REPO)
    if resumed.returncode == 2:  # the eviction took the namespace's meta hash itself
        one_line_error(resumed.stderr, "has no data in this Redis")
    else:
        assert resumed.returncode == 3, resumed.stderr
        one_line_error(resumed.stderr, "evicted", "during an earlier run", "reset")
    assert (
        run_cli("reset", "--yes", "--redis-url", server.url, "--namespace", ns, cwd=REPO).returncode
        == 0
    )
    again = run_cli(
        "ingest", str(path), *run_args(server.url, ns), "--output", "/dev/null", cwd=REPO
    )
    assert again.returncode == 2  # the policy is still allkeys-lru: refused without the flag
    client.config_set("maxmemory-policy", "noeviction")
    clean = run_cli("ingest", str(path), *run_args(server.url, ns), cwd=REPO)
    assert clean.returncode == 0, clean.stderr
    expected_out, expected_states = reference_run(lines)
    assert clean.stdout == expected_out
    assert committed_states(server.url, ns) == expected_states
    client.close()


def test_a_worker_paused_mid_batch_wakes_up_to_a_refused_commit(redis_url, real, events, tmp_path):
    from rq import Worker

    path, lines = events
    ns = new_namespace()
    keys = Keys(ns)
    args = ["--redis-url", redis_url, "--namespace", ns]
    workers = [popen_cli("worker", *args) for _ in range(2)]
    out = tmp_path / "out.txt"
    driver = popen_cli(
        "ingest", str(path), *args, "--workers", "0", "--partitions", "2", "--flow", SLOW_FLOW,
        "--output", str(out),
    )  # fmt: skip
    paused = None
    try:
        deadline = time.monotonic() + 60
        while paused is None:  # a batch while its worker runs it: its lease names the job
            assert time.monotonic() < deadline and driver.poll() is None
            for p in range(2):
                job_id = real.get(keys.lease(p))
                running = [
                    w
                    for w in Worker.all(connection=real)
                    if job_id and w.get_current_job_id() == job_id.decode()
                ]
                if running:
                    paused = running[0].pid
                    break
            time.sleep(0.01)
        os.kill(paused, signal.SIGSTOP)
        time.sleep(8)  # its lease expires; the batch runs again on the other worker
        os.kill(paused, signal.SIGCONT)  # it goes on applying, and its commit is refused
        _, stderr = driver.communicate(timeout=120)
    finally:
        if paused is not None:
            os.kill(paused, signal.SIGCONT)
        for w in workers:
            w.kill()
            w.communicate()
    assert driver.returncode == 0, stderr
    assert "lost its worker; sending it again" in stderr
    expected_out, expected_states = reference_run(lines)
    assert out.read_text() == expected_out
    assert committed_states(redis_url, ns) == expected_states
