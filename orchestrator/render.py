"""What the commands print: run summaries, status, a key's state, dead letters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator import queries
from orchestrator.commands import describe_bad, resume_hint, run_exit_status, run_reason
from orchestrator.driver import RunResult
from orchestrator.messages import note, say
from orchestrator.settings import Settings
from orchestrator.wording import counted
from tasks.errors import ExitStatus


def dead_letters(settings: Settings, action: str, *, as_json: bool) -> ExitStatus:
    """List or clear the namespace's dead letters."""
    if action == "clear":
        note(f"cleared {counted(queries.clear_dead_letters(settings), 'dead letter')}")
        return ExitStatus.OK
    letters = queries.list_dead_letters(settings)
    for letter in letters:
        if as_json:
            print(json.dumps(letter))  # exact: JSON escapes control characters itself
        else:
            where = f"{letter['input']}:{letter['line']} (epoch {letter['epoch']})"
            print(escape_controls(f"{where}: {letter['reason']}"))
            print(f"    {escape_controls(letter['raw'])}")
    if not as_json and not letters:
        note("no dead letters")
    return ExitStatus.OK


def escape_controls(text: str) -> str:
    """``text`` with every non-printable character escaped as Python writes it (``\\x1b``,
    ``\\t``, ``\\u200b``): a bad input line may hold terminal escape sequences, which
    must not reach the terminal that lists it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def report_run(settings: Settings, path: Path, result: RunResult) -> ExitStatus:
    """Summarize a run on stderr and choose its exit status."""
    if result.skipped:
        first = describe_bad(path, result.skipped[0])
        more = f" (first: {first})" if len(result.skipped) > 1 else f": {first}"
        lines = counted(len(result.skipped), "bad line")
        if settings.on_error == "dead-letter":
            note(f"dead-lettered {lines}{more}; list them with 'orchestrator dead-letters'")
        else:
            note(f"skipped {lines}{more}")
    if result.failure is not None:
        resume = resume_hint(settings, path)
        if result.failure.kind == "rejected":
            advice = f"fix the input and run '{resume}' (or add --on-error skip)"
        else:  # the flow hung or killed its worker on a valid line: the input is not at fault
            more = " with a higher --batch-timeout" if result.failure.kind == "timeout" else ""
            advice = f"fix the flow, or run '{resume}'{more} or with --on-error skip or dead-letter"
        say(f"{run_reason(path, result)}; {advice}")
        return run_exit_status(result)
    events = counted(result.events, "event")
    reruns = counted(result.reruns, "batch", "batches")
    more = f", {reruns} re-run after losing a worker" if result.reruns else ""
    note(f"done: {events}, committed through epoch {result.committed}{more}")
    return run_exit_status(result)


def print_status(report: dict[str, Any], *, as_json: bool) -> None:
    """Print the status report."""
    if as_json:
        print(json.dumps(report))
        return
    print(f"namespace:       {report['namespace']} on {report['redis']}")
    if report["partitions"] is None:
        print("state:           empty (no ingest yet)")
        return
    retention = report["retention"]
    print(f"input:           {report['input']}")
    print(f"output file:     {report['output'] or '(stdout)'}")
    print(f"flow:            {report['flow']}")
    print(
        f"committed epoch: {report['committed_epoch']} (next line at byte {report['next_offset']})"
    )
    lag = report["lag_epochs"]
    print(
        f"read epoch:      {report['read_epoch']} "
        f"(lag {'unknown' if lag is None else counted(lag, 'epoch')})"
    )
    print(
        f"events/s:        {report['committed_events_per_s']} committed, "
        f"{report['events_per_s']} read (last run)"
    )
    if report["source_position"] is not None:
        entries, seconds = report["source_lag_entries"], report["source_lag_seconds"]
        if entries is None:
            behind = "lag unknown: the stream is not on this Redis (--source-url?)"
        else:
            behind = f"{counted(entries, 'entry', 'entries')}, {seconds:.3f} s behind"
        print(f"source:          after entry {report['source_position']} ({behind})")
    print(
        f"replayable from: epoch {retention['replayable_from']} "
        f"(--retain-epochs {retention['retain_epochs']})"
    )
    print(f"dead letters:    {report['dead_letters']}")
    print(f"driver:          {report['driver'] or 'not running'}")
    if (last := report["last_run"]) is not None:
        print(
            f"last run:        {last['command']} ended {last['ended_at']}, exit "
            f"{last['exit_status']}: {escape_controls(last['reason'])}"
        )
    print(f"workers:         {report['workers']} listening")
    print(f"partitions:      {report['partitions']}")
    if (rescale := report["rescale"]) is not None:
        steps = counted(rescale["steps_staged"], "step")
        if rescale["running"]:
            print(f"  rescaling to {rescale['to_partitions']}: {steps} staged so far")
        else:
            print(
                f"  a rescale to {rescale['to_partitions']} stopped before its end ({steps} "
                f"staged): the next run deletes them; ask for --partitions "
                f"{rescale['to_partitions']} again to rescale"
            )
    for row in report["partition_progress"]:
        print(
            f"  p{row['partition']}: applied through epoch {row['applied_through']}, "
            f"{counted(row['backlog_events'], 'event')} waiting, "
            f"{counted(row['queued_jobs'], 'job')} queued"
        )
    if report["rq_worker_command"] is not None:
        print(f"plain RQ worker: {report['rq_worker_command']}")
    else:  # the embedded server lives only while a command uses it: no URL to give out
        print(
            f"more workers:    {report['worker_command']} (the embedded server runs only while "
            "a command uses it: start them while a run is going)"
        )


def print_state(found: dict[str, Any], *, as_json: bool) -> None:
    """Print one key's state."""
    if as_json:
        print(json.dumps(found))
        return
    state = "no state" if found["state"] is None else json.dumps(found["state"])
    print(f"{found['key']} (partition {found['partition']}) as of epoch {found['epoch']}: {state}")
