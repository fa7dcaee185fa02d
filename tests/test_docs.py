"""README.md and docs/*.md are executed or checked against the code.

docs/cart-join.md is executed: its code blocks run, and their outputs must match
the page. Fences understood: ``json file=NAME`` writes a file; ``python`` runs (in
one namespace, in order), optionally ``raises=ExceptionName``, and an ``output``
fence right after it holds what it prints; ``console`` holds ``$ command`` lines,
each followed by its expected stdout and optionally ``[exit N]``.

README.md's tutorial block is run and compared. Elsewhere: every ``orchestrator``
command line shown parses, every option of ``--help`` is in docs/cli.md (and every
option there exists), every key ``tasks/keys.py`` names is in docs/internals.md's
key table, quoted messages are the code's, relative links lead to files (and
headings) that exist, and the README stays short.
"""

import argparse
import ast
import contextlib
import inspect
import io
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from orchestrator.cli import build_parser
from tasks import keys as keys_module

from conftest import REPO, cli_env

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


@pytest.mark.integration
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


@pytest.mark.integration
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


DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
CLI_DOC = DOCS / "cli.md"
INTERNALS = DOCS / "internals.md"


def page_text(path):
    return path.read_text()


def all_text():
    """README and every page under docs/, each run of white space one space (quotes wrap)."""
    return " ".join(" ".join(page_text(p).split()) for p in PAGES)


# Messages the docs quote in prose, where a run that prints them is long to set up (a
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
        "cannot use the data directory .orchestrator: read-only file system (the embedded "
        "server keeps its data there: give a writable --data-dir, or --redis-url)",
        [".orchestrator", "read-only file system"],
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
def test_a_message_the_docs_quote_is_what_the_code_says(quoted, values):
    assert quoted in all_text()
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


def test_the_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


# --- links -------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(path):
    """The anchors GitHub gives the headings of a page."""
    anchors = set()
    for line in page_text(path).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def relative_links():
    return [
        (page, target)
        for page in PAGES
        for target in LINK.findall(page_text(page))
        if not re.match(r"[a-z]+:", target)
    ]


@pytest.mark.parametrize(
    ("page", "target"), relative_links(), ids=[f"{p.name}->{t}" for p, t in relative_links()]
)
def test_a_relative_link_leads_to_a_file_and_heading_that_exist(page, target):
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f"{page.name}: {target}"
    if anchor:
        assert anchor in heading_anchors(linked), f"{page.name}: {target}"


# --- command lines -----------------------------------------------------------------------

CODE = re.compile(r"^```[^\n]*\n(.*?)^```|`([^`\n]+)`", re.S | re.M)
# What the docs write for a value, and a value of that kind that parses.
PLACEHOLDERS = {
    "FILE": "in.json", "N": "1", "KEY": "a", "URL": "redis://localhost:6379/0",
    "NAME": "ns", "P": "4", "DIR": "d", "PATH": "out.txt", "SECONDS": "5", "B": "100",
}  # fmt: skip


def code_snippets(path):
    """The lines of a page's code blocks and its inline code spans."""
    snippets = []
    for block, span in CODE.findall(page_text(path)):
        snippets += block.splitlines() if block else [span]
    return snippets


def shown_commands(path):
    """Every ``orchestrator COMMAND ...`` a page shows, cut at a pipe, ';' or '&&'."""
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    found = []
    for snippet in code_snippets(path):
        for match in re.finditer(r"(?:^|[\s$])orchestrator ((?:-|[a-z])[^|;&]*)", snippet):
            words = shlex.split(match[1].replace("\\", ""))
            if len(words) > 1 and words[0] in commands or words == ["--version"]:
                found.append(words)  # (a command's name alone is a mention, not a line)
    return found


def parses(words):
    argv = [PLACEHOLDERS.get(w.strip("[]"), w.strip("[]")) for w in words]
    argv = [w for w in argv if w]
    if argv == ["--version"]:
        return True
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


def test_the_docs_show_commands_for_every_page_that_has_them():
    shown = {p.name for p in PAGES if shown_commands(p)}
    assert {"README.md", "cli.md", "operations.md", "cart-join.md"} <= shown


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_orchestrator_command_line_shown_parses(page, capsys):
    wrong = [" ".join(words) for words in shown_commands(page) if not parses(words)]
    capsys.readouterr()  # (argparse's complaints)
    assert wrong == []


def bench_commands():
    """``python -m bench...`` command lines the pages show: (module, its options)."""
    found = []
    for page in PAGES:
        for snippet in code_snippets(page):
            for match in re.finditer(r"python -m (bench(?:\.\w+)?)((?: [^|;&>]*)?)", snippet):
                found.append((match[1], re.findall(r"(?<![\w-])--[a-z][\w-]*", match[2])))
    return found


def test_every_bench_option_shown_exists():
    shown = bench_commands()
    assert {module for module, _ in shown} >= {"bench", "bench.worker", "bench.generate"}
    for module in {module for module, _ in shown}:
        help_text = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
            check=True,
        ).stdout  # fmt: skip
        for option in {o for m, options in shown if m == module for o in options}:
            assert re.search(rf"(?<![\w-]){option}(?![\w-])", help_text), (module, option)


# --- docs/cli.md and --help --------------------------------------------------------------


def parsers():
    """The top-level parser and every command's, by name."""
    top = build_parser()
    return {"": top, **top._subparsers._group_actions[0].choices}


def help_options():
    """Every option ``--help`` shows, and every environment variable it names."""
    options, env = set(), set()
    for parser in parsers().values():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            options.update(o for o in action.option_strings if o not in ("-h", "--help"))
            for names in re.findall(r"\(env ([A-Z_]+(?: or [A-Z_]+)*)\)", action.help or ""):
                env.update(names.split(" or "))
    return options, env


def test_every_option_and_variable_of_help_is_in_docs_cli():
    options, env = help_options()
    assert {"--redis-url", "-u", "--from-epoch", "--yes", "--version"} <= options  # sanity
    text = page_text(CLI_DOC)
    missing = [o for o in sorted(options | env) if not re.search(rf"(?<![\w-]){o}(?![\w-])", text)]
    assert missing == []


def test_every_option_docs_cli_shows_exists():
    options, _ = help_options()
    shown = set()
    for snippet in code_snippets(CLI_DOC):
        # option mentions (`--json`, `-u/--redis-url URL`) and this command's lines
        if snippet.startswith("-") or snippet.startswith("orchestrator "):
            shown.update(re.findall(r"(?<![\w-])--?[a-z][\w-]*(?=$|[\s/=\]])", snippet))
    unknown = shown - options - {"--help", "-"}
    assert unknown == set()


def test_every_exit_status_is_in_docs_cli():
    from tasks.errors import ExitStatus

    table = page_text(CLI_DOC).split("## Exit statuses", 1)[1]
    for status in ExitStatus:
        assert re.search(rf"^\| {int(status)} \|", table, re.M), status


# --- docs/internals.md's key table -------------------------------------------------------

SAMPLE = {"namespace": "NS", "generation": 111, "partition": 222, "last_epoch": 333}


def named_keys():
    """Every Redis key ``Keys`` names, written as the docs write them (``<ns>:p<P>:state``)."""
    keys = keys_module.Keys(SAMPLE["namespace"])
    found = []
    for name, member in vars(keys_module.Keys).items():
        if name.startswith("_") or "pattern" in name or name in ("owns", "generation_of"):
            continue
        if not callable(member) and not isinstance(member, property):
            continue  # (a field: tagged)
        if isinstance(member, property):
            value = getattr(keys, name)
        else:
            params = list(inspect.signature(member).parameters)[1:]
            if not set(params) <= set(SAMPLE):
                continue  # (queue_names: a list of names)
            value = getattr(keys, name)(*[SAMPLE[p] for p in params])
        found.append(value)
    job = keys.job_id(SAMPLE["generation"], SAMPLE["partition"], SAMPLE["last_epoch"])
    found.append(keys_module.rq_job_key(job))
    shown = []
    for value in found:
        if ":" not in value:
            continue  # an RQ queue name or job id, not a key
        for placeholder, sample in [("<ns>", "NS"), ("<gen>", "111"), ("<P>", "222"),
                                    ("<E>", "333")]:  # fmt: skip
            value = value.replace(sample, placeholder)
        shown.append(value)
    return shown


def key_table():
    section = page_text(INTERNALS).split("## The Redis key layout", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)`", section, re.M)


def test_the_key_table_names_every_key_of_tasks_keys():
    named = named_keys()
    assert len(named) >= 14 and "<ns>:{<ns>-p<P>}:batch:g<gen>-e<E>" in named  # sanity
    assert sorted(set(named) - set(key_table())) == []


def test_the_key_table_names_no_key_that_tasks_keys_does_not():
    assert sorted(set(key_table()) - set(named_keys())) == []


def cli_example_lines():
    """The example session of docs/cli.md: its command lines, in order."""
    section = page_text(CLI_DOC).split("For example, from the repository root", 1)[1]
    return FENCE.search(section)[3].splitlines()


def readme_first_output():
    """What README's first command prints: the tutorial's output without its bad line."""
    section = README.read_text().split("## Two commands", 1)[1]
    return [m[3] for m in FENCE.finditer(section)][1]


@pytest.mark.integration
def test_the_example_session_of_docs_cli_runs_and_writes_the_output_file_once(tmp_path):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    lines = cli_example_lines()
    assert len(lines) >= 8 and all(line.startswith("orchestrator ") for line in lines)
    for i, line in enumerate(lines):
        run = subprocess.run(
            line, shell=True, cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        # The first run stops at the tutorial's bad line; the rest go on from there.
        assert run.returncode == (65 if i == 0 else 0), (line, run.stderr)
    # A failed run, a resume and a replay wrote the file of one clean run, byte for byte.
    assert (tmp_path / "out.txt").read_text() == readme_first_output()
