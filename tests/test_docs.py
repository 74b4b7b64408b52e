"""The documentation site's sources (``make docs`` builds them; CI runs it): every command of the
parser has its page, in the navigation, and the generated option tables name every option."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from vaelab.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _hook():
    spec = importlib.util.spec_from_file_location("cli_options", ROOT / "docs/hooks/cli_options.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_has_a_page_in_the_navigation():
    pages = {p.stem for p in (ROOT / "docs/cli").glob("*.md")} - {"index"}
    assert pages == set(_commands())
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for name in pages:
        text = (ROOT / f"docs/cli/{name}.md").read_text(encoding="utf-8")
        assert f"<!-- vaelab-cli: {name} -->" in text
        assert f"cli/{name}.md" in nav


def test_the_generated_tables_name_every_option():
    hook = _hook()
    for name, parser in _commands().items():
        page = hook.on_page_markdown(f"<!-- vaelab-cli: {name} -->")
        assert page.startswith("```text\nvaelab " + name)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert f"`{option}`" in page, (name, option)
        assert not re.search(r"<!-- vaelab-cli", page)


def test_every_tutorial_is_executed_and_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in (ROOT / "docs/tutorials").glob("*.md"):
        text = page.read_text(encoding="utf-8")
        assert 'exec="on"' in text and "assert " in text, page.name
        assert f"tutorials/{page.name}" in nav, page.name
