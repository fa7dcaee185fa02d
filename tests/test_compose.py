"""compose.yaml: valid against the Compose specification, and its topology works without Docker.

No Docker engine runs here, so the second test starts what compose.yaml describes
with the file's own settings and command lines: a redis-server with the `redis`
service's command, several workers with the `worker` service's command, and the
driver with the `docker compose run` command docs/operations.md gives.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, RedisServer, cli_env, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMPOSE = REPO / "compose.yaml"


def test_compose_file_follows_the_compose_specification():
    run = subprocess.run(
        ["check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def readme_compose_runs():
    """The `docker compose run --rm orchestrator ...` lines of the docs' code blocks."""
    text = "".join(p.read_text() for p in [REPO / "README.md", *sorted(REPO.glob("docs/*.md"))])
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("docker compose run --rm orchestrator ")]


def entrypoint():
    """The image's ENTRYPOINT, from the Dockerfile."""
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])", (REPO / "Dockerfile").read_text(), re.M)
    return json.loads(match[1])


def host_path(arg, volumes):
    """A path inside the container mapped to the repository, through the service's volumes."""
    for volume in volumes:
        source, target = volume.split(":")[:2]
        if arg.startswith(target + "/"):
            return str((REPO / source).resolve()) + arg[len(target) :]
    return arg


def as_local(argv):
    """The container's `orchestrator ...` command, run with this Python."""
    assert argv[0] == "orchestrator"
    return [sys.executable, "-m", "orchestrator", *argv[1:]]


def test_the_compose_topology_gives_the_embedded_runs_output(tmp_path):
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    # redis: the compose file's own command and settings, on a private socket here.
    redis_args = services["redis"]["command"]
    assert redis_args[0] == "redis-server"
    server = RedisServer(str(tmp_path))
    server.args = [server.args[0], *redis_args[1:], "--port", "0", "--unixsocket", server.socket,
                   "--dir", str(tmp_path)]  # fmt: skip
    server.start()
    env = cli_env(**{k: str(v) for k, v in services["worker"]["environment"].items()})
    env["REDIS_URL"] = server.url  # the service name `redis` resolves only inside compose
    workers = [
        subprocess.Popen(
            as_local(entrypoint() + services["worker"]["command"]),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(3)  # docker compose up -d --scale worker=3
    ]
    try:
        [run_line] = [x for x in readme_compose_runs() if " ingest " in x]
        args = shlex.split(run_line)[len(shlex.split("docker compose run --rm orchestrator")) :]
        volumes = services["orchestrator"]["volumes"]
        driver = subprocess.run(
            as_local(entrypoint() + [host_path(a, volumes) for a in args]),
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        # The workers' health check, run where they run (the same host), says healthy.
        check = services["worker"]["healthcheck"]["test"]
        assert check[0] == "CMD"
        health = subprocess.run(
            as_local(check[1:]), env=env, capture_output=True, text=True, timeout=60
        )
        assert health.returncode == 0 and "3 workers of this host" in health.stdout, health
    finally:
        for w in workers:
            w.terminate()
            w.wait(timeout=30)
        server.stop()
    assert driver.returncode == 0, driver.stderr
    # The same command without compose: the embedded server and its own workers.
    shutil.copy(REPO / "examples" / "cart-join.json", tmp_path / "cart-join.json")
    embedded = run_cli("ingest", "cart-join.json", "--on-error", "skip", cwd=tmp_path / ".")
    assert embedded.returncode == 0, embedded.stderr
    assert driver.stdout == embedded.stdout
    assert driver.stdout.count("\n") == 7
