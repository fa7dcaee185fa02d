"""docs/cart-join.md is executed: its code blocks run, and their outputs must match the page.

Fences understood: ``json file=NAME`` writes a file; ``python`` runs (in one
namespace, in order), optionally ``raises=ExceptionName``, and an ``output``
fence right after it holds what it prints; ``console`` holds ``$ command``
lines, each followed by its expected stdout and optionally ``[exit N]``.
"""

import contextlib
import io
import re
import subprocess

import pytest

from conftest import REPO, cli_env

pytestmark = pytest.mark.integration

DOC = REPO / "docs" / "cart-join.md"
FENCE = re.compile(r"^```(\S*)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks():
    return [(m[1], m[2].strip(), m[3]) for m in FENCE.finditer(DOC.read_text())]


def run_python(code, options, ns):
    out = io.StringIO()
    expected_exc = dict(o.split("=") for o in options.split()).get("raises")
    with contextlib.redirect_stdout(out):
        try:
            exec(compile(code, str(DOC), "exec"), ns)
        except Exception as e:
            if type(e).__name__ != expected_exc:
                raise
        else:
            assert expected_exc is None, f"expected {expected_exc}"
    return out.getvalue()


def run_console(text, cwd):
    commands = re.split(r"^\$ ", text, flags=re.M)[1:]
    for chunk in commands:
        command, _, expected = chunk.partition("\n")
        status = 0
        match = re.search(r"^\[exit (\d+)\]\n\Z", expected, re.M)
        if match:
            status = int(match[1])
            expected = expected[: match.start()]
        run = subprocess.run(
            command, shell=True, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=120
        )
        assert (run.returncode, run.stdout) == (status, expected), (command, run.stderr)


def test_the_tutorial_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__main__"}
    parsed = blocks()
    kinds = [kind for kind, _, _ in parsed]
    assert kinds.count("python") >= 5 and kinds.count("console") == 3
    printed = None
    for kind, options, body in parsed:
        if kind == "json" and options.startswith("file="):
            (tmp_path / options.removeprefix("file=")).write_text(body)
        elif kind == "python":
            printed = run_python(body, options, ns)
        elif kind == "output":
            assert printed == body
            printed = None
        elif kind == "console":
            run_console(body, tmp_path)
