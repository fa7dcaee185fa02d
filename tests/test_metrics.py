"""Prometheus metrics (--metrics-port): the text format, what a real run's counters say, the
port checks, and docs/metrics.md against the metrics the code exposes."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import orjson
import psutil
import pytest

from bench.generate import generate
from orchestrator.driver import _reason
from orchestrator.errors import InputError
from orchestrator.metrics import DriverMetrics, DriverServer, reason_label
from orchestrator.reader import finish_oversized
from tasks.keys import Keys
from tasks.metrics import Registry, WorkerMetrics, parse_address

from conftest import REPO, SEED_INPUT, cli_env, new_namespace, run_cli
from helpers import run_command
from reference import reference_run

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """The samples of a text exposition, by (name, labels); types and help checked as read."""
    samples: dict[tuple[str, frozenset], float] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            typed[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels = m[1], frozenset(LABEL.findall(m[3] or ""))
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"{name} has no TYPE line"
        value = m[4]
        samples[(name, labels)] = math.inf if value == "+Inf" else float(value)
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape(port: int) -> dict[tuple[str, frozenset], float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return parse(reply.read().decode())
    except OSError:
        return None


def free_ports(count: int) -> int:
    """A first port of ``count`` consecutive free ones on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise AssertionError("no free ports")


# ------------------------------------------------------------------ the text format


def test_a_registry_renders_counters_gauges_and_cumulative_histograms():
    reg = Registry()
    c = reg.counter("x_total", "Things.", ("namespace", "reason"))
    g = reg.gauge("y", "A level.")
    h = reg.histogram("z_seconds", "Times.", ("namespace",), buckets=(0.1, 1))
    c.inc(2, ("a", 'say "hi"\n'))
    c.inc(3, ("a", 'say "hi"\n'))
    g.set(-1)
    for seconds in (0.05, 0.5, 0.5, 7):
        h.observe(seconds, ("a",))
    samples = parse(reg.render().decode())
    assert value(samples, "x_total", namespace="a", reason='say \\"hi\\"\\n') == 5
    assert value(samples, "y") == -1
    assert value(samples, "z_seconds_bucket", namespace="a", le="0.1") == 1
    assert value(samples, "z_seconds_bucket", namespace="a", le="1") == 3
    assert value(samples, "z_seconds_bucket", namespace="a", le="+Inf") == 4
    assert value(samples, "z_seconds_count", namespace="a") == 4
    assert value(samples, "z_seconds_sum", namespace="a") == pytest.approx(8.05)


def test_metrics_addresses_parse_and_bad_ones_are_refused():
    assert (parse_address("9100").host, parse_address("9100").port) == ("127.0.0.1", 9100)
    assert parse_address("0.0.0.0:9100").host == "0.0.0.0"
    assert parse_address("[::1]:9100").host == "::1"
    for bad in ("0", "65536", "http", ":9100", "9100x"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_bad_line_reasons_become_few_labels():
    def reason_of(line: bytes) -> str:
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError as e:
            return _reason(e)
        raise AssertionError(line)

    assert reason_label(reason_of(b"FAIL HERE"), "rejected") == "invalid_json"
    assert reason_label(reason_of(b'{"a": 1'), "rejected") == "invalid_json"
    assert reason_label(reason_of(b'"\xff"'), "rejected") == "invalid_utf8"

    _, _, too_long, _ = finish_oversized(io.BytesIO(b"x" * 50 + b"\n"), b"x" * 20, 10)
    assert reason_label(too_long, "rejected") == "too_long"
    assert reason_label(_reason(InputError("anything")), "rejected") == "rejected"
    assert reason_label("whatever", "timeout") == "timeout"
    assert reason_label("whatever", "killed") == "worker_killed"


def test_docs_metrics_lists_exactly_the_metrics_the_code_exposes():
    page = (REPO / "docs" / "metrics.md").read_text()
    driver_part, worker_part = page.split("## A worker's metrics")
    for part, registry in (
        (driver_part, DriverMetrics("ns", "fail").registry),
        (worker_part, WorkerMetrics().registry),
    ):
        rows = re.findall(r"^\| `(orchestrator_[a-z_]+)` \| (\w+) \|", part, re.MULTILINE)
        assert [name for name, _ in rows] == registry.names()  # each once, in the code's order
        for metric, (_, kind) in zip(registry.metrics, rows, strict=True):
            assert kind == metric.kind, metric.name
            # Prometheus conventions: counters end in _total, times are in seconds
            assert metric.name.endswith("_total") == (kind == "counter"), metric.name
            assert "duration" not in metric.name or metric.name.endswith("_seconds")


def test_the_grafana_dashboard_queries_only_metrics_the_code_exposes():

    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {
        re.sub(r"_(bucket|sum|count)$", "", n)
        for e in exprs
        for n in re.findall(r"orchestrator_\w+", e)
    }
    exposed = set(DriverMetrics("ns", "fail").registry.names() + WorkerMetrics().registry.names())
    assert queried <= exposed and len(queried) >= 15


# ------------------------------------------------------------------ the port


def test_a_metrics_port_in_use_is_refused_in_one_line_before_anything_starts(tmp_path):
    port = free_ports(1)
    (tmp_path / "in.json").write_text('{"user_id": "a", "type": "order", "order_id": 1}\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        run = run_cli(
            "ingest", "in.json", "--metrics-port", str(port), "--data-dir", "d", cwd=tmp_path
        )
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"orchestrator: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    ]


def test_a_bad_metrics_port_is_a_usage_error(tmp_path):
    run = run_cli("worker", "--metrics-port", "70000", cwd=tmp_path)
    assert run.returncode == 2
    assert "--metrics-port" in run.stderr and "65535" in run.stderr
    assert "Traceback" not in run.stderr


# ------------------------------------------------------------------ a real run


def wait_for(predicate, timeout=60.0, every=0.05):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return found


def workers_of(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            if "worker" in child.cmdline():
                found.append(child)
    return found


@pytest.mark.integration
@pytest.mark.slow
def test_a_runs_metrics_match_its_facts_during_and_after_killed_workers(tmp_path, redis_url, real):

    port = free_ports(3)
    namespace = new_namespace()
    lines = list(generate(3_000, 200, seed=5))
    first, rest = lines[:300], lines[300:]
    bad_at = 100
    first.insert(bad_at, "FAIL HERE")
    path = tmp_path / "events.json"
    path.write_text("\n".join(first) + "\n")
    out = open(tmp_path / "out", "w")  # noqa: SIM115
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", str(path), "--follow",
         "--on-error", "skip", "--metrics-port", str(port), "--redis-url", redis_url,
         "--namespace", namespace, "--workers", "2", "--partitions", "2", "--flow", "tests.flows.slow_cart:flow", "-q"],
        cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ns = {"namespace": namespace}
    try:
        # During the run: the first part committed, a bad line counted by its reason.
        during = wait_for(
            lambda: (
                (s := scrape(port))
                and s.get(("orchestrator_committed_epoch", frozenset(ns.items()))) == len(first) - 1
                and s
            )
        )
        assert value(during, "orchestrator_events_committed_total", **ns) == len(first) - 1
        assert value(during, "orchestrator_lag_events", **ns) == 0
        assert (
            value(
                during, "orchestrator_bad_lines_total", policy="skip", reason="invalid_json", **ns
            )
            == 1
        )
        # Every forked worker serves its own metrics on the next ports.
        for i in range(2):
            assert wait_for(lambda i=i: scrape(port + 1 + i)) is not None
        # More lines, and both workers killed while the slow flow runs a batch of them.
        with open(path, "a") as f:
            f.write("\n".join(rest) + "\n")
        # (a worker holds a partition's lease while it runs a batch)
        wait_for(lambda: any(real.get(Keys(namespace).lease(p)) for p in range(2)), every=0.01)
        victims = workers_of(driver.pid)
        assert len(victims) == 2
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        total = len(lines) + 1  # (the bad line is an epoch too)
        after = wait_for(
            lambda: (
                (s := scrape(port))
                and value(s, "orchestrator_committed_epoch", **ns) == total - 1
                and s
            ),
            timeout=90,
        )
        replaced = [scrape(port + 1 + i) for i in range(2)]
    finally:
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=60)
        out.close()
    assert driver.returncode == 130, stderr
    # After: the run's facts.
    assert value(after, "orchestrator_events_committed_total", **ns) == len(lines)
    assert value(after, "orchestrator_events_read_total", **ns) == len(lines)
    assert value(after, "orchestrator_lines_read_total", **ns) == total
    assert (
        value(after, "orchestrator_bad_lines_total", policy="skip", reason="invalid_json", **ns)
        == 1
    )
    assert value(after, "orchestrator_batches_resent_total", **ns) >= 1
    assert value(after, "orchestrator_worker_restarts_total", **ns) == 2
    assert value(after, "orchestrator_lag_events", **ns) == 0
    batches = value(after, "orchestrator_batches_committed_total", **ns)
    assert value(after, "orchestrator_batch_duration_seconds_count", **ns) == batches
    assert value(after, "orchestrator_batch_events_count", **ns) >= batches
    assert value(after, "orchestrator_batch_events_sum", **ns) >= len(lines)
    assert value(after, "orchestrator_commit_duration_seconds_count", **ns) >= 1
    # The replacement workers serve on the same ports, and applied the re-sent batches.
    assert all(s is not None for s in replaced)
    applied = sum(
        v for s in replaced for (name, _), v in s.items()
        if name == "orchestrator_worker_events_applied_total"
    )  # fmt: skip
    assert 0 < applied <= len(rest)
    expected, _ = reference_run([*first, *rest], skip_bad=True)
    assert (tmp_path / "out").read_text() == expected


@pytest.fixture
def served(monkeypatch):
    """The metrics of every driver command run in this process, as they were at its end."""

    seen: list[DriverMetrics] = []
    real_init = DriverServer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append(self.metrics)

    monkeypatch.setattr(DriverServer, "__init__", init)
    return seen


@pytest.mark.integration
def test_dead_letters_and_a_failing_line_are_counted_by_policy(redis_url, tmp_path, served):

    common = ["--redis-url", redis_url, "--workers", "0", "--partitions", "2"]
    port = str(free_ports(1))
    dead = run_command(
        ["ingest", str(SEED_INPUT), *common, "--namespace", new_namespace(),
         "--on-error", "dead-letter", "--metrics-port", port], redis_url,
    )  # fmt: skip
    failed = run_command(
        ["ingest", str(SEED_INPUT), *common, "--namespace", (ns := new_namespace()),
         "--metrics-port", port], redis_url,
    )  # fmt: skip
    assert (dead.status, failed.status) == (0, 65)
    after_dead, after_fail = (parse(m.registry.render().decode()) for m in served)
    name = {"namespace": served[0].ns[0]}
    assert (
        value(
            after_dead,
            "orchestrator_bad_lines_total",
            policy="dead-letter",
            reason="invalid_json",
            **name,
        )
        == 1
    )
    assert value(after_dead, "orchestrator_dead_letters_total", **name) == 1
    assert value(after_dead, "orchestrator_events_committed_total", **name) == 7
    assert value(after_dead, "orchestrator_committed_epoch", **name) == 7
    assert (
        value(
            after_fail,
            "orchestrator_bad_lines_total",
            policy="fail",
            reason="invalid_json",
            namespace=ns,
        )
        == 1
    )
    assert value(after_fail, "orchestrator_events_committed_total", namespace=ns) == 5
    assert value(after_fail, "orchestrator_committed_epoch", namespace=ns) == 4
    assert value(after_fail, "orchestrator_dead_letters_total", namespace=ns) == 0
