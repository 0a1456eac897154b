"""MkDocs hook: show facts about other software from facts.yml on the pages.

A page writes `{{ fact: ID }}` where the value belongs, or `{{ fact_cited: ID }}` for the
value followed by the date it was checked and a link to its source. An unknown ID, or a
token that is not written in one of these two forms, fails the build with the page and the
ID in the message.

Tokens inside fenced code blocks and inline code spans are left as written. The tests run
the code blocks from the Markdown source, so a value substituted only on the site would
show readers code that was never run, and a page can still show the token syntax itself.
"""

from __future__ import annotations

import datetime
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
FACTS_MODULE_PATH = ROOT / "tests" / "harness" / "facts.py"

TOKEN = re.compile(r"\{\{\s*(?P<form>fact|fact_cited)\s*:\s*(?P<id>[^\s{}]+)\s*\}\}")
# Anything that starts like a token, to catch misspelled forms that TOKEN would skip.
TOKEN_START = re.compile(r"\{\{\s*fact")
FENCE_OPENING = re.compile(r"^(?P<indent>[ \t]*)(?P<marker>`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(?P<ticks>`+)(?!`).*?(?<!`)(?P=ticks)(?!`)", re.S)


def _load_facts_module() -> ModuleType:
    # MkDocs puts only hooks/ on sys.path while it imports a hook, so the loader that the
    # tests and the stale check share is imported from its file.
    name = "serverless_guide_facts"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FACTS_MODULE_PATH)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import {FACTS_MODULE_PATH}")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, because dataclasses look their module up by name.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


facts_module = _load_facts_module()
Fact = facts_module.Fact


class UnknownFact(PluginError):
    """A page names a fact that facts.yml does not contain, or writes a token wrongly."""


def format_date(day: datetime.date) -> str:
    return f"{day.day} {day.strftime('%B %Y')}"


def render_token(form: str, fact: Fact) -> str:
    if form == "fact":
        return fact.value
    return f"{fact.value} (checked {format_date(fact.checked)}, [source]({fact.source}))"


def _replace_tokens(text: str, facts: dict[str, Fact], page: str) -> str:
    def replace(match: re.Match[str]) -> str:
        fact_id = match.group("id")
        fact = facts.get(fact_id)
        if fact is None:
            raise UnknownFact(
                f"{page}: unknown fact id '{fact_id}' in '{match.group(0)}'; "
                "add it to facts.yml or correct the id"
            )
        return render_token(match.group("form"), fact)

    replaced = TOKEN.sub(replace, text)
    leftover = TOKEN_START.search(replaced)
    if leftover:
        end = replaced.find("}}", leftover.start())
        token = replaced[leftover.start() : end + 2 if end >= 0 else leftover.start() + 40]
        raise UnknownFact(
            f"{page}: '{token}' is not a fact token; write {{{{ fact: ID }}}} or "
            "{{ fact_cited: ID }} with an id from facts.yml"
        )
    return replaced


def _replace_outside_inline_code(text: str, facts: dict[str, Fact], page: str) -> str:
    pieces = []
    position = 0
    for span in INLINE_CODE.finditer(text):
        pieces.append(_replace_tokens(text[position : span.start()], facts, page))
        pieces.append(span.group(0))
        position = span.end()
    pieces.append(_replace_tokens(text[position:], facts, page))
    return "".join(pieces)


def _split_fences(markdown: str) -> list[tuple[bool, str]]:
    """Split a page into (inside_fence, text) parts, fences kept with their marker lines."""
    parts: list[tuple[bool, str]] = []
    prose: list[str] = []
    fence: list[str] = []
    marker = ""

    for line in markdown.splitlines(keepends=True):
        if not marker:
            opening = FENCE_OPENING.match(line)
            if opening:
                parts.append((False, "".join(prose)))
                prose = []
                marker = opening.group("marker")
                fence = [line]
            else:
                prose.append(line)
            continue

        fence.append(line)
        stripped = line.strip()
        if stripped.startswith(marker) and stripped.strip(marker[0]) == "":
            parts.append((True, "".join(fence)))
            fence = []
            marker = ""

    # A fence that is never closed runs to the end of the page, as Markdown reads it.
    parts.append((bool(marker), "".join(fence if marker else prose)))
    return parts


def render_facts(markdown: str, facts: dict[str, Fact], page: str) -> str:
    """Replace every fact token outside code with its value; raise UnknownFact otherwise."""
    rendered = []
    for inside_fence, text in _split_fences(markdown):
        if inside_fence:
            rendered.append(text)
        else:
            rendered.append(_replace_outside_inline_code(text, facts, page))
    return "".join(rendered)


_facts: dict[str, Fact] = {}


def on_config(config):
    global _facts
    try:
        _facts = facts_module.load_facts()
    except facts_module.InvalidFactsFile as error:
        raise PluginError(str(error)) from None
    return config


def on_page_markdown(markdown, page, config, files):
    return render_facts(markdown, _facts, page.file.src_path)
