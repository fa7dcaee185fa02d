"""docs/cart-join.md is executed: its code blocks run, and their outputs must match the page.

Fences understood: ``json file=NAME`` writes a file; ``python`` runs (in one
namespace, in order), optionally ``raises=ExceptionName``, and an ``output``
fence right after it holds what it prints; ``console`` holds ``$ command``
lines, each followed by its expected stdout and optionally ``[exit N]``.
"""

import ast
import contextlib
import io
import re
import shutil
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


README = REPO / "README.md"
TUTORIAL = "## The tutorial's crash and resume, with these commands"


def readme_console_block():
    """The console block of README's tutorial section: [(command, expected lines)]."""
    section = README.read_text().split(TUTORIAL, 1)[1].split("\n## ", 1)[0]
    [(_, _, body)] = [m.groups() for m in FENCE.finditer(section)]
    steps = []
    for chunk in re.split(r"^\$ ", body, flags=re.M)[1:]:
        command, _, expected = chunk.partition("\n")
        steps.append((command, expected.splitlines()))
    return steps


def matches(printed, expected):
    """Whether printed lines are the expected ones, where a line '...' stands for any lines."""
    pattern = "".join(".*?" if line == "..." else re.escape(line + "\n") for line in expected)
    return re.fullmatch(pattern, "".join(line + "\n" for line in printed), re.S) is not None


def test_the_readme_tutorial_prints_what_the_readme_quotes(tmp_path):
    shutil.copy(REPO / "examples" / "cart-join.json", tmp_path / "cart-join.json")
    steps = readme_console_block()
    assert [command for command, _ in steps] == [
        "orchestrator ingest cart-join.json",
        "echo $?",
        "orchestrator resume cart-join.json --on-error skip",
    ]
    status = 0
    for command, expected in steps:
        # (exit N) first: `echo $?` then says the status of the command before it
        run = subprocess.run(
            f"(exit {status}); {command}", shell=True, cwd=tmp_path, env=cli_env(),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        printed = run.stdout.splitlines() + run.stderr.splitlines()  # stdout, then stderr
        assert matches(printed, expected), (command, printed, expected)
        status = run.returncode


# Messages README.md quotes in prose, where a run that prints them is long to set up (a
# Redis that restarts empty, a paused driver, a hung flow): each must be what the code
# says. With each, the parts of the quote that stand for a value the message puts in.
QUOTED_MESSAGES = [
    ("the data of namespace ... is gone from Redis", ["..."]),
    ("has no data in this Redis", []),
    ("another driver took over", []),
    ("timed out: the flow did not finish epoch E (key K) within T s", ["E", "K", "T"]),
    ("killed its worker: 2 worker processes died running epoch E (key K)", ["2", "E", "K"]),
    ("gzip-compressed input: decompress it first (e.g.", []),
    (
        "cannot use the data directory .orchestrator: Read-only file system (...)",
        [".orchestrator", "Read-only file system", "..."],
    ),
]


def message_templates():
    """Every string in the code's sources, with "{}" where an f-string puts a value."""
    found = []
    for path in [*(REPO / "orchestrator").glob("*.py"), *(REPO / "tasks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                found.append(
                    "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append(node.value)
    return found


@pytest.mark.parametrize(("quoted", "values"), QUOTED_MESSAGES, ids=[q for q, _ in QUOTED_MESSAGES])
def test_a_message_the_readme_quotes_is_what_the_code_says(quoted, values):
    assert quoted in README.read_text().replace("\n", " ")
    # The quote's words, with "{}" in the code wherever the quote shows a value.
    if values:
        tokens = re.split(
            "(" + "|".join(rf"(?<!\w){re.escape(v)}(?!\w)" for v in values) + ")", quoted
        )
        pieces = tokens[::2]
    else:
        pieces = [quoted]
    pattern = r"\{\}".join(re.escape(piece) for piece in pieces)
    assert any(re.search(pattern, text) for text in message_templates()), pattern
