"""Generated data through the CLI on a real Redis by URL: output equals the seed's plain loop."""

import pytest

from bench.generate import generate

from conftest import cli_env, new_namespace, run_cli
from reference import reference_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS, USERS = 30_000, 3_000


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "events.json"
    lines = list(generate(EVENTS, USERS, seed=2))
    path.write_text("\n".join(lines) + "\n")
    expected, _ = reference_run(lines)
    return path, expected


@pytest.mark.parametrize("partitions", [1, 4, 16])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_output_is_byte_identical_to_the_plain_loop(
    generated, redis_url, tmp_path, partitions, workers
):
    path, expected = generated
    run = run_cli(
        "ingest", str(path), "--redis-url", redis_url, "--namespace", new_namespace(),
        "--partitions", str(partitions), "--workers", str(workers),
        cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
