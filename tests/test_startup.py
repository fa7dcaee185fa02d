"""Start-up: the embedded server starts before the heavy imports, and never outlives a failed run."""

import subprocess
import sys

import pytest

from orchestrator.embedded import JEMALLOC_SONAME, server_allocator
from orchestrator.server import EmbeddedServer, client_for

from conftest import REPO, SEED_INPUT, cli_env, run_cli
from helpers import servers_in


def test_the_cli_module_imports_neither_redis_nor_rq():
    # A run starts its embedded server first and imports these (~0.2 s) while it loads.
    check = "import sys, orchestrator.cli; print(sorted({'redis', 'rq'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_a_run_that_fails_before_reaching_redis_stops_the_server_it_started(tmp_path):
    (tmp_path / "in.json").write_text(SEED_INPUT.read_text())
    run = run_cli("ingest", "in.json", "--flow", "no_such_module:flow", cwd=tmp_path, env=cli_env())
    assert run.returncode == 2, run.stderr
    assert "no_such_module" in run.stderr
    assert servers_in((tmp_path / ".orchestrator").resolve()) == []
    assert not (tmp_path / ".orchestrator" / "server.json").exists()


def test_a_missing_input_leaves_no_data_directory(tmp_path):
    run = run_cli("ingest", "missing.json", cwd=tmp_path, env=cli_env())
    assert run.returncode == 66
    assert not (tmp_path / ".orchestrator").exists()


def server_libraries(data_dir):
    (pid,) = servers_in(data_dir.resolve())
    with open(f"/proc/{pid}/maps") as maps:
        return maps.read()


@pytest.mark.skipif(server_allocator() is None, reason="no jemalloc on this machine")
def test_the_embedded_server_runs_with_jemalloc_when_the_system_has_it(tmp_path, monkeypatch):
    monkeypatch.delenv("ORCHESTRATOR_SERVER_JEMALLOC", raising=False)
    with EmbeddedServer(tmp_path / "data", persistent=False):
        assert JEMALLOC_SONAME in server_libraries(tmp_path / "data")


def test_the_embedded_server_keeps_libc_malloc_when_told_to(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_SERVER_JEMALLOC", "0")
    with EmbeddedServer(tmp_path / "data", persistent=False) as url:
        assert "jemalloc" not in server_libraries(tmp_path / "data")
        client = client_for(url)
        assert client.ping()
        client.close()


def test_a_starting_server_is_seen_as_running_from_its_first_moment(tmp_path):
    # redis-server rewrites its command line (its title) as it starts; a check that read it
    # saw a running server as gone for a moment, and a run stopped, blaming the server.
    from orchestrator.embedded import redis_server_binary
    from orchestrator.keeper import is_redis_server

    args = [redis_server_binary(), "--port", "0", "--save", ""]
    for i in range(5):
        socket_path = str(tmp_path / f"r{i}.sock")
        server = subprocess.Popen([*args, "--unixsocket", socket_path], stdout=subprocess.DEVNULL)
        try:
            assert all(is_redis_server(server.pid) for _ in range(300))
        finally:
            server.kill()
            server.wait()
        assert not is_redis_server(server.pid)
