"""facts.yml, the hook that shows its facts on pages, and the command that lists stale ones."""

from __future__ import annotations

import datetime
import importlib.util
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from tests.harness.facts import Fact, InvalidFactsFile, load_facts, stale_facts
from tests.harness.snippets import ROOT, replace_once

HOOK = ROOT / "hooks" / "facts.py"
DOCS = ROOT / "docs"
TODAY = datetime.date(2026, 12, 4)

FACTS = {
    "example.plan.name": Fact(
        "example.plan.name", "Example Basic", "https://example.org/plans", TODAY
    ),
    "example.api.version": Fact(
        "example.api.version", "2024-09-16", "https://example.org/api", datetime.date(2026, 1, 2)
    ),
}

# Broken copies of the hook and of the stale check, each removing one protection.
NO_FENCE_SKIPPING = (("        if inside_fence:\n", "        if False:\n"),)
UNKNOWN_ID_KEPT = (
    ("        if fact is None:\n", "        if fact is None:\n            return match.group(0)\n"),
    ("    leftover = TOKEN_START.search(replaced)\n", "    leftover = None\n"),
)
AGE_IGNORED = (
    (
        "if fact.age_days(today) > max_age_days]",
        "if fact.age_days(today) > max_age_days and False]",
    ),
)


def load_copy(path: Path, replacements: tuple[tuple[str, str], ...] = ()) -> ModuleType:
    """Run a Python file, or a broken copy of it, as a new module."""
    source = path.read_text("utf-8")
    for old, new in replacements:
        source = replace_once(source, old, new, name=path.name)
    name = f"copy_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


@pytest.fixture
def hook() -> ModuleType:
    return load_copy(HOOK)


def write_facts(directory: Path, entries: dict[str, dict[str, object]]) -> Path:
    lines = ["facts:"]
    for fact_id, fields in entries.items():
        lines.append(f"  {fact_id}:")
        lines.extend(f"    {name}: {value}" for name, value in fields.items())
    path = directory / "facts.yml"
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


def run_stale(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.harness.facts", "stale", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_value_token_replaced(hook):
    rendered = hook.render_facts("Plan: {{ fact: example.plan.name }}.", FACTS, "page.md")

    assert rendered == "Plan: Example Basic."


def test_cited_token_adds_date_and_source(hook):
    rendered = hook.render_facts("{{ fact_cited: example.api.version }}", FACTS, "page.md")

    assert rendered == "2024-09-16 (checked 2 January 2026, [source](https://example.org/api))"


def test_token_spacing_optional(hook):
    rendered = hook.render_facts("{{fact:example.plan.name}}", FACTS, "page.md")

    assert rendered == "Example Basic"


def test_fenced_code_left_alone(hook):
    page = (
        "Before {{ fact: example.plan.name }}\n"
        "```python\n"
        'print("{{ fact: example.plan.name }}")\n'
        "```\n"
        "~~~text\n"
        "{{ fact: example.plan.name }}\n"
        "~~~\n"
        "After {{ fact: example.plan.name }}\n"
    )

    rendered = hook.render_facts(page, FACTS, "page.md")

    assert rendered.count("{{ fact: example.plan.name }}") == 2
    assert rendered.startswith("Before Example Basic\n")
    assert rendered.endswith("After Example Basic\n")


def test_indented_fence_in_tab_left_alone(hook):
    page = (
        '=== "Python"\n\n'
        "    ````python\n"
        "    x = '{{ fact: example.plan.name }}'\n"
        "    ```\n"
        "    still code {{ fact: example.plan.name }}\n"
        "    ````\n"
        "text {{ fact: example.plan.name }}\n"
    )

    rendered = hook.render_facts(page, FACTS, "page.md")

    assert rendered.count("{{ fact: example.plan.name }}") == 2
    assert rendered.endswith("text Example Basic\n")


def test_inline_code_left_alone(hook):
    page = "Write `{{ fact: example.plan.name }}` to show {{ fact: example.plan.name }}."

    rendered = hook.render_facts(page, FACTS, "page.md")

    assert rendered == "Write `{{ fact: example.plan.name }}` to show Example Basic."


def test_unknown_id_names_page(hook):
    with pytest.raises(hook.UnknownFact) as raised:
        hook.render_facts("{{ fact: example.plan.nmae }}", FACTS, "practices/x.md")

    assert "practices/x.md" in str(raised.value)
    assert "example.plan.nmae" in str(raised.value)


def test_misspelled_form_rejected(hook):
    with pytest.raises(hook.UnknownFact, match="is not a fact token"):
        hook.render_facts("{{ facts: example.plan.name }}", FACTS, "practices/x.md")


def test_unknown_id_fails_strict_build(hook):
    assert issubclass(hook.UnknownFact, hook.PluginError)


def test_every_page_token_resolves(hook):
    facts = load_facts()
    unresolved = []
    for page in sorted(DOCS.rglob("*.md")):
        try:
            hook.render_facts(page.read_text("utf-8"), facts, str(page.relative_to(DOCS)))
        except hook.UnknownFact as error:
            unresolved.append(str(error))

    assert unresolved == []


def test_repository_facts_load():
    facts = load_facts()

    assert "cockroachdb.plans.basic.name" in facts
    assert all(fact.source.startswith("https://") for fact in facts.values())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"value": "x", "source": "https://example.org"}, "missing checked"),
        ({"value": "x", "source": "http://example.org", "checked": "2026-12-04"}, "https://"),
        ({"value": "x", "source": "https://example.org", "checked": "soon"}, "YYYY-MM-DD"),
        ({"value": "''", "source": "https://example.org", "checked": "2026-12-04"}, "non-empty"),
        (
            {"value": "x", "source": "https://e.org", "checked": "2026-12-04", "by": "me"},
            "unknown fields by",
        ),
    ],
    ids=["no-date", "plain-http", "bad-date", "empty-value", "extra-field"],
)
def test_invalid_fact_rejected(tmp_path, fields, message):
    path = write_facts(tmp_path, {"example.fact": fields})

    with pytest.raises(InvalidFactsFile, match=message):
        load_facts(path)


def test_invalid_id_rejected(tmp_path):
    fields = {"value": "x", "source": "https://example.org", "checked": "2026-12-04"}
    path = write_facts(tmp_path, {"Example": fields})

    with pytest.raises(InvalidFactsFile, match="lowercase words joined by dots"):
        load_facts(path)


def test_stale_boundary_at_max_age():
    facts = {
        "a.on-limit": Fact("a.on-limit", "x", "https://e.org", TODAY - datetime.timedelta(365)),
        "a.past-limit": Fact("a.past-limit", "x", "https://e.org", TODAY - datetime.timedelta(366)),
    }

    stale = stale_facts(facts, TODAY, 365)

    assert [fact.id for fact in stale] == ["a.past-limit"]


def test_stale_command_lists_old_facts(tmp_path):
    path = write_facts(
        tmp_path,
        {
            "old.fact": {"value": "v1", "source": "https://e.org/old", "checked": "2025-01-01"},
            "new.fact": {"value": "v2", "source": "https://e.org/new", "checked": "2026-11-01"},
        },
    )

    result = run_stale("--facts", str(path), "--today", "2026-12-04")

    assert result.returncode == 1
    assert "old.fact: checked 2025-01-01 (702 days ago)" in result.stdout
    assert "https://e.org/old" in result.stdout
    assert "new.fact" not in result.stdout


def test_stale_command_passes_when_current(tmp_path):
    fields = {"value": "v", "source": "https://e.org", "checked": "2026-11-01"}
    path = write_facts(tmp_path, {"new.fact": fields})

    result = run_stale("--facts", str(path), "--today", "2026-12-04")

    assert result.returncode == 0
    assert "All 1 facts" in result.stdout


def test_stale_command_max_age_option(tmp_path):
    fields = {"value": "v", "source": "https://e.org", "checked": "2026-11-01"}
    path = write_facts(tmp_path, {"new.fact": fields})

    result = run_stale("--facts", str(path), "--today", "2026-12-04", "--max-age-days", "30")

    assert result.returncode == 1
    assert "new.fact: checked 2026-11-01 (33 days ago)" in result.stdout


def test_stale_command_invalid_file(tmp_path):
    path = write_facts(tmp_path, {"bad.fact": {"value": "v"}})

    result = run_stale("--facts", str(path), "--today", "2026-12-04")

    assert result.returncode == 2
    assert "bad.fact" in result.stderr
    assert "missing source, checked" in result.stderr


def test_stale_command_bad_option():
    result = run_stale("--today", "04/12/2026")

    assert result.returncode == 2
    assert "invalid date '04/12/2026'" in result.stderr


class TestBrokenCopiesFail:
    """Each check above goes red when the hook or the stale check loses a protection."""

    def test_fence_replaced_without_skipping(self):
        broken = load_copy(HOOK, NO_FENCE_SKIPPING)
        page = "~~~text\n{{ fact: example.plan.name }}\n~~~\n"

        rendered = broken.render_facts(page, FACTS, "page.md")

        assert "{{ fact: example.plan.name }}" not in rendered

    def test_unknown_id_passes_silently(self):
        broken = load_copy(HOOK, UNKNOWN_ID_KEPT)

        rendered = broken.render_facts("{{ fact: example.plan.nmae }}", FACTS, "page.md")

        assert rendered == "{{ fact: example.plan.nmae }}"

    def test_age_ignored_finds_nothing(self):
        broken = load_copy(ROOT / "tests" / "harness" / "facts.py", AGE_IGNORED)
        old = Fact("old.fact", "v", "https://e.org", datetime.date(2020, 1, 1))

        assert broken.stale_facts({"old.fact": old}, TODAY) == []
