"""A mkdocs hook: each ``<!-- vaelab-cli: COMMAND -->`` in a page becomes that command's usage,
description and option tables, read from ``vaelab.cli.parser.build_parser()`` while the site
builds, so the pages of the command line cannot drift from ``vaelab COMMAND --help``."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

MARKER = re.compile(r"<!-- vaelab-cli: ([a-z-]+) -->")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from vaelab.cli.parser import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise RuntimeError("vaelab's parser has no commands")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return " \\| ".join(f"`{choice}`" for choice in action.choices)
    metavar = action.metavar or action.dest.upper()
    return f"`{metavar}`" if isinstance(metavar, str) else f"`{' '.join(metavar)}`"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": "vaelab"}
    return _cell(text)


def _table(actions: list[argparse.Action]) -> str:
    rows = ["| option | value | what it does |", "| --- | --- | --- |"]
    for action in actions:
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names, value = ", ".join(f"`{n}`" for n in action.option_strings), _value(action)
        else:  # a positional argument: its metavar is its name
            names, value = _value(action) or f"`{action.dest}`", ""
        rows.append(f"| {names} | {value} | {_help(action)} |")
    return "\n".join(rows)


def command_markdown(name: str) -> str:
    """The usage, description and one table per option group of ``vaelab NAME``."""
    commands = _subparsers()
    if name not in commands:
        raise KeyError(f"vaelab has no command {name!r}; it has {', '.join(commands)}")
    parser = commands[name]
    # argparse wraps the usage at the terminal's width: fix it, so every build writes the same page.
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        usage = parser.format_usage().removeprefix("usage: ").strip()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    parts = [f"```text\n{usage}\n```", _cell(parser.description or "")]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if actions:
            parts.append(f"**{group.title}**\n\n{_table(actions)}")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return MARKER.sub(lambda match: command_markdown(match.group(1)), markdown)
