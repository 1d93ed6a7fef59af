"""`prefect-maintenance`: the maintenance flows, and deploying them, from a terminal.

    prefect-maintenance retention --older-than-days 90 --tag team-a --dry-run
    prefect-maintenance reconcile --dry-run --late-after-hours 48
    prefect-maintenance health --json report.json
    prefect-maintenance deploy
    prefect-maintenance worker

`retention`, `reconcile` and `health` run their flow in this process against
`PREFECT_API_URL` (and `MAINTENANCE_DATABASE_URL` when set): the run and its artifacts
show in the UI as usual. They print the report's summary (`--json`: the whole report, to
standard output or a file) and exit 1 when the flow fails. Their options are made from the
flow's own parameters and docstring, so the command line and the UI's Custom run form
always offer the same: a list parameter is a repeatable option (`--tag a --tag b`), a
mapping one takes `KEY=VALUE` (`--per-state-days FAILED=90`), `none` empties an optional
value. A bad value fails before anything is read, naming the option, the way the flow
itself would refuse it (exit code 2).

A retention run that deletes first runs the same retention as a dry run, shows what it
would delete and asks to confirm, unless `--yes`; without a terminal to ask, it refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.summaries import health_summary, reconcile_summary, retention_summary


@dataclass(frozen=True)
class FlowCommand:
    name: str
    module: str
    function: str
    summarize: Callable[[Any], list[str]]
    # "module:callable" that validates the flow's arguments the way the flow does first.
    validator: str

    def flow(self):
        return _load(f"{self.module}:{self.function}")

    def validate(self, parameters: dict[str, Any]) -> None:
        _load(self.validator)(**parameters)


def _load(reference: str):
    module_name, _, attribute = reference.partition(":")
    target = __import__(module_name, fromlist=[attribute.split(".")[0]])
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


FLOW_COMMANDS = (
    FlowCommand(
        "retention",
        "flows.retention",
        "retention",
        retention_summary,
        "tasks.retention.parameters:RetentionParameters.parse",
    ),
    FlowCommand(
        "reconcile",
        "flows.reconcile",
        "reconcile_stuck_runs",
        reconcile_summary,
        "tasks.reconcile.parameters:ReconcileParameters.parse",
    ),
    FlowCommand(
        "health",
        "flows.db_health",
        "db_health_report",
        health_summary,
        "tasks.health.thresholds:HealthParameters.parse",
    ),
)
NONE_WORDS = ("none", "null", "")


class CommandLineError(Exception):
    """Options that cannot become the flow's parameters; the message names the option."""


# ------------------------------------------------------------- options from parameters


def _option(parameter: str, schema: dict[str, Any]) -> str:
    name = parameter.replace("_", "-")
    # A list is given one item at a time: --tag a --tag b.
    if _kind(schema) == "array" and name.endswith("s"):
        name = name[:-1]
    return f"--{name}"


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [branch for branch in schema.get("anyOf", [schema]) if branch.get("type") != "null"]


def _nullable(schema: dict[str, Any]) -> bool:
    return any(branch.get("type") == "null" for branch in schema.get("anyOf", []))


def _kind(schema: dict[str, Any]) -> str:
    branches = _branches(schema)
    return branches[0].get("type", "string") if branches else "string"


def _scalar(schema: dict[str, Any], nullable: bool) -> Callable[[str], Any]:
    kind = schema.get("type", "string")
    choices = schema.get("enum")

    def convert(raw: str) -> Any:
        if nullable and raw.strip().lower() in NONE_WORDS:
            return None
        try:
            value = {"integer": int, "number": float}.get(kind, str)(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a {kind}, not {raw!r}") from None
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(f"takes one of {', '.join(map(str, choices))}, not {raw!r}")
        return value

    return convert


def _pair(schema: dict[str, Any]) -> Callable[[str], tuple[str, Any]]:
    keys = schema.get("propertyNames", {})
    value = _scalar(schema.get("additionalProperties", {}), nullable=False)
    key = _scalar(keys, nullable=False) if keys else str

    def convert(raw: str) -> tuple[str, Any]:
        name, equals, text = raw.partition("=")
        if not equals:
            raise argparse.ArgumentTypeError(f"takes KEY=VALUE, not {raw!r}")
        return key(name.strip()), value(text.strip())

    return convert


def add_flow_options(parser: argparse.ArgumentParser, flow) -> dict[str, str]:
    """One option per flow parameter, typed and described from the flow; returns parameter -> option."""
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flow.fn).model_dump()
    options: dict[str, str] = {}
    for parameter, spec in sorted(schema["properties"].items(), key=lambda item: item[1].get("position", 0)):
        option = _option(parameter, spec)
        options[parameter] = option
        description = " ".join((spec.get("description") or "").split())
        kind, branch, nullable = _kind(spec), _branches(spec)[0] if _branches(spec) else {}, _nullable(spec)
        default = spec.get("default")
        arguments: dict[str, Any] = {"dest": parameter, "default": argparse.SUPPRESS}
        if kind == "boolean":
            arguments.update(action=argparse.BooleanOptionalAction)
            shown = "yes" if default else "no"
        elif kind == "array":
            arguments.update(action="append", type=_scalar(branch.get("items", {}), nullable=False))
            arguments["metavar"] = "|".join(branch.get("items", {}).get("enum", [])) or "VALUE"
            shown = ", ".join(map(str, default or ())) or None
        elif kind == "object":
            arguments.update(action="append", type=_pair(branch), metavar="KEY=VALUE")
            shown = json.dumps(default) if default else None
        else:
            arguments.update(type=_scalar(branch, nullable))
            arguments["metavar"] = "|".join(map(str, branch.get("enum", []))) or kind.upper()
            # An empty text default means "not set": the description says what that does.
            shown = "none" if default is None else str(default) or None
        help_text = description if shown is None else f"{description} (default: {shown})"
        parser.add_argument(option, help=help_text.replace("%", "%%"), **arguments)
    return options


def flow_parameters(arguments: argparse.Namespace, options: dict[str, str]) -> dict[str, Any]:
    """The parameters the options set: lists as given, KEY=VALUE pairs as a mapping."""
    parameters = {}
    for parameter in options:
        if not hasattr(arguments, parameter):
            continue
        value = getattr(arguments, parameter)
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            value = dict(value)
        parameters[parameter] = value
    return parameters


# ---------------------------------------------------------------------- running flows


def _run(flow, parameters: dict[str, Any]):
    return asyncio.run(flow(**parameters))


def _confirm_deletion(command: FlowCommand, flow, parameters: dict[str, Any], assume_yes: bool) -> bool:
    """Run the dry run of this retention and ask whether to delete what it counted."""
    dry = _run(flow, {**parameters, "dry_run": True})
    for line in command.summarize(dry):
        print(line)
    if dry.flow_runs_deleted == 0:
        print("Nothing to delete.")
        return False
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise CommandLineError(
            f"not deleting {dry.flow_runs_deleted} flow runs without confirmation: "
            "run it in a terminal or pass --yes"
        )
    answer = input(f"Delete these {dry.flow_runs_deleted} flow runs and everything they own? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def run_flow_command(command: FlowCommand, arguments: argparse.Namespace, options: dict[str, str]) -> int:
    flow = command.flow()
    parameters = flow_parameters(arguments, options)
    try:
        flow.validate_parameters(parameters)
        # The flow's own first step: a bad value fails here, before anything is read.
        command.validate({name: value for name, value in parameters.items() if name in options})
    except Exception as error:  # both name the parameter
        raise CommandLineError(_named_by_option(str(error), options)) from None
    deletes = command.name == "retention" and not parameters.get("dry_run", False)
    try:
        if deletes and not _confirm_deletion(command, flow, parameters, arguments.yes):
            print("Nothing was deleted.")
            return 0
        report = _run(flow, parameters)
    except CommandLineError:
        raise
    except Exception as error:
        print(f"{command.name} failed: {_named_by_option(str(error), options)}", file=sys.stderr)
        return 1
    if arguments.json is None:
        for line in command.summarize(report):
            print(line)
    elif arguments.json == "-":
        print(report.model_dump_json(indent=2))
    else:
        Path(arguments.json).write_text(report.model_dump_json(indent=2))
        for line in command.summarize(report):
            print(line)
    return 0


def _named_by_option(message: str, options: dict[str, str]) -> str:
    """A parameter's error message as the command line's user reads it: by the option's name."""
    for parameter, option in sorted(options.items(), key=lambda item: -len(item[0])):
        message = re.sub(rf"(?<![\w-])(parameter )?{parameter}(?=[:.])", option, message)
    return message


# ------------------------------------------------------------------------------ main


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, dict[str, str]]]:
    parser = argparse.ArgumentParser(
        prog="prefect-maintenance",
        description=__doc__.split("\n")[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    options = {}
    for command in FLOW_COMMANDS:
        flow = command.flow()
        summary = (flow.fn.__doc__ or "").strip().split("\n")[0]
        sub = commands.add_parser(command.name, help=summary, description=summary)
        options[command.name] = add_flow_options(sub, flow)
        sub.add_argument(
            "--json",
            nargs="?",
            const="-",
            metavar="FILE",
            help="write the whole report as JSON to FILE (standard output without one)",
        )
        if command.name == "retention":
            sub.add_argument("--yes", action="store_true", help="delete without asking first")
    commands.add_parser("deploy", help="the maintenance work pool, its queue and every deployment")
    commands.add_parser("worker", help="the one worker of the maintenance pool and queue")
    return parser, options


def main(argv: list[str] | None = None) -> int:
    parser, options = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "deploy":
        from deploy.bootstrap import main as deploy

        return deploy()
    if arguments.command == "worker":
        from deploy.worker import main as worker

        return worker()
    command = next(command for command in FLOW_COMMANDS if command.name == arguments.command)
    try:
        return run_flow_command(command, arguments, options[command.name])
    except CommandLineError as error:
        parser.exit(2, f"prefect-maintenance {command.name}: error: {error}\n")
