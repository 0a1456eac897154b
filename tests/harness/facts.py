"""Load facts.yml, the facts about other software that pages show, and list the stale ones.

Each fact has an id, a value, the source page it was read from and the date it was last
checked against that page. `python -m tests.harness.facts stale` lists the facts checked
longer ago than a maximum age, 365 days or the number given with --max-age-days. It exits
with status 1 when there are any, so a scheduled job can report them for checking.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FACTS_FILE = ROOT / "facts.yml"
DEFAULT_MAX_AGE_DAYS = 365
FACT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)+$")
REQUIRED_FIELDS = ("value", "source", "checked")

EXIT_CURRENT = 0
EXIT_STALE = 1
EXIT_INVALID = 2


class InvalidFactsFile(ValueError):
    """facts.yml cannot be read, or one of its facts lacks a field or has a bad one."""


@dataclass(frozen=True)
class Fact:
    """One fact about other software, with where and when it was last confirmed."""

    id: str
    value: str
    source: str
    checked: datetime.date

    def age_days(self, today: datetime.date) -> int:
        return (today - self.checked).days


def load_facts(path: Path = FACTS_FILE) -> dict[str, Fact]:
    """Read and check a facts file; raise InvalidFactsFile naming the fact that is wrong."""
    try:
        document = yaml.safe_load(path.read_text("utf-8"))
    except FileNotFoundError:
        raise InvalidFactsFile(f"{path} does not exist") from None
    except yaml.YAMLError as error:
        raise InvalidFactsFile(f"{path} is not valid YAML: {error}") from None

    if not isinstance(document, dict) or not isinstance(document.get("facts"), dict):
        raise InvalidFactsFile(f"{path} must contain a mapping named 'facts'")

    facts = {}
    for fact_id, fields in document["facts"].items():
        facts[fact_id] = _parse_fact(path, fact_id, fields)
    return facts


def _parse_fact(path: Path, fact_id: object, fields: object) -> Fact:
    where = f"{path.name}: fact {fact_id!r}"
    if not isinstance(fact_id, str) or not FACT_ID.match(fact_id):
        raise InvalidFactsFile(
            f"{where}: an id is lowercase words joined by dots, such as cockroachdb.plans.basic"
        )
    if not isinstance(fields, dict):
        raise InvalidFactsFile(f"{where} must be a mapping with {', '.join(REQUIRED_FIELDS)}")

    missing = [name for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        raise InvalidFactsFile(f"{where} is missing {', '.join(missing)}")
    unknown = sorted(set(fields) - set(REQUIRED_FIELDS))
    if unknown:
        raise InvalidFactsFile(
            f"{where} has unknown fields {', '.join(unknown)}; "
            f"a fact has only {', '.join(REQUIRED_FIELDS)}"
        )

    value = fields["value"]
    if not isinstance(value, str | int | float) or isinstance(value, bool) or value == "":
        raise InvalidFactsFile(f"{where}: value must be a non-empty string or number")
    source = fields["source"]
    if not isinstance(source, str) or not source.startswith("https://"):
        raise InvalidFactsFile(f"{where}: source must be the https:// address of the page read")
    checked = fields["checked"]
    if not isinstance(checked, datetime.date) or isinstance(checked, datetime.datetime):
        raise InvalidFactsFile(f"{where}: checked must be a date written as YYYY-MM-DD")

    return Fact(fact_id, str(value), source, checked)


def stale_facts(
    facts: dict[str, Fact], today: datetime.date, max_age_days: int = DEFAULT_MAX_AGE_DAYS
) -> list[Fact]:
    """Return the facts last checked more than max_age_days before today, oldest first."""
    stale = [fact for fact in facts.values() if fact.age_days(today) > max_age_days]
    return sorted(stale, key=lambda fact: (fact.checked, fact.id))


def _parse_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date {text!r}; write it as YYYY-MM-DD") from None


def _parse_max_age(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = -1
    if days < 0:
        raise argparse.ArgumentTypeError(f"invalid age {text!r}; give a whole number of days >= 0")
    return days


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.facts",
        description="Check the facts about other software that the pages show.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    stale = commands.add_parser(
        "stale",
        help="list the facts last checked too long ago; exit 1 when there are any",
    )
    stale.add_argument(
        "--max-age-days",
        type=_parse_max_age,
        default=DEFAULT_MAX_AGE_DAYS,
        help=f"oldest acceptable check, in days (default {DEFAULT_MAX_AGE_DAYS})",
    )
    stale.add_argument(
        "--facts",
        type=Path,
        default=FACTS_FILE,
        help="facts file to read (default: facts.yml at the repository root)",
    )
    stale.add_argument(
        "--today",
        type=_parse_date,
        default=None,
        help="date to measure ages from, as YYYY-MM-DD (default: the current date)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    today = arguments.today or datetime.date.today()

    try:
        facts = load_facts(arguments.facts)
    except InvalidFactsFile as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID

    stale = stale_facts(facts, today, arguments.max_age_days)
    if not stale:
        print(
            f"All {len(facts)} facts in {arguments.facts} were checked within the last "
            f"{arguments.max_age_days} days."
        )
        return EXIT_CURRENT

    print(
        f"{len(stale)} of {len(facts)} facts in {arguments.facts} were last checked more than "
        f"{arguments.max_age_days} days before {today.isoformat()}. Check each against its "
        "source, then update its value and its checked date:"
    )
    for fact in stale:
        print(f"- {fact.id}: checked {fact.checked.isoformat()} ({fact.age_days(today)} days ago)")
        print(f"  value: {fact.value}")
        print(f"  source: {fact.source}")
    return EXIT_STALE


if __name__ == "__main__":
    sys.exit(main())
