"""The region page's nearest-region function, its data file, and the tables the page shows.

The page's two tables are read from the Markdown source and recomputed with the snippet,
so the page cannot show a distance, an estimate or a choice that the code does not make.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.harness.facts import load_facts
from tests.harness.snippets import ROOT, SnippetLoader

NEAREST_REGION = "regions/nearest_region.py"
REGIONS_DATA = "regions/regions.json"
PAGE = ROOT / "docs" / "practices" / "region-selection.md"

pytestmark = pytest.mark.snippet(NEAREST_REGION)

# Broken copies of the snippet, each removing one behaviour the page describes.
NO_ROUTE_FACTOR = (("ROUTE_FACTOR = 1.5", "ROUTE_FACTOR = 1.0"),)
FIRST_CLUSTER_REGION_ONLY = (("for target in cluster\n", "for target in cluster[:1]\n"),)
NO_PLAN_CHECK = (("    if plan not in region.plans:\n", "    if False:\n"),)
NO_CROSS_PROVIDER_NOTE = (
    ("    if not _offers_plan(regions, function_provider, plan):\n", "    if False:\n"),
)


def markdown_table(text: str, first_header: str) -> list[dict[str, str]]:
    """Return the rows of the table whose first header cell is first_header."""
    lines = text.splitlines()
    start = None
    for number, line in enumerate(lines):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            headers = cells
            start = number + 2
            break
    if start is None:
        raise AssertionError(f"no table starting with {first_header!r} in {PAGE}")

    rows = []
    # The line after the header is the separator row.
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.append(dict(zip(headers, cells, strict=True)))
    return rows


def note_kind(note: str | None) -> str:
    if note is None:
        return "none"
    if "has no" in note:
        return "no regions for the plan"
    return "crosses providers"


def round_trip_mismatches(module: ModuleType) -> list[str]:
    """Compare the page's round-trip table with the snippet's distances and estimates."""
    azure = module.load_regions()["azure"]
    mismatches = []
    for row in markdown_table(PAGE.read_text("utf-8"), "From"):
        distance = module.great_circle_km(azure[row["From"]], azure[row["To"]])
        page_values = (row["Great-circle distance (km)"], row["Estimate (ms), computed"])
        computed = (f"{distance:,.0f}", f"{module.estimated_round_trip_ms(distance):.0f}")
        if page_values != computed:
            mismatches.append(f"{row['From']} to {row['To']}: page {page_values}, code {computed}")
    return mismatches


def case_mismatches(module: ModuleType) -> list[str]:
    """Compare the page's table of setups with what nearest_region() returns for each."""
    mismatches = []
    for row in markdown_table(PAGE.read_text("utf-8"), "Function on"):
        placement = module.nearest_region(
            row["Function on"],
            row["Cluster on"],
            [region.strip() for region in row["Cluster regions"].split(",")],
            row["Plan"],
        )
        page_values = (row["Function region"], row["Distance (km)"], row["Note"])
        computed = (
            placement.function_region,
            f"{placement.distance_km:.1f}",
            note_kind(placement.note),
        )
        if page_values != computed:
            mismatches.append(f"{row}: code returns {computed}")
    return mismatches


def regions_of(data: dict, provider: str, plan: str) -> list[str]:
    entries = data["providers"][provider]
    return sorted(entry["region"] for entry in entries if plan in entry["plans"])


def fact_list(facts: dict, fact_id: str) -> list[str]:
    return sorted(name.strip() for name in facts[fact_id].value.split(","))


@pytest.fixture
def nearest(snippets: SnippetLoader) -> ModuleType:
    return snippets.load(NEAREST_REGION)


@pytest.fixture
def region_data(snippets: SnippetLoader) -> dict:
    return json.loads(Path(snippets.path(REGIONS_DATA)).read_text("utf-8"))


def test_page_round_trip_table_matches(nearest):
    assert round_trip_mismatches(nearest) == []


def test_page_estimate_claims_hold(nearest):
    rows = markdown_table(PAGE.read_text("utf-8"), "From")
    far = [row for row in rows if float(row["Great-circle distance (km)"].replace(",", "")) > 3000]
    estimate = {(row["From"], row["To"]): float(row["Estimate (ms), computed"]) for row in rows}
    measured = {(row["From"], row["To"]): float(row["Azure P95 (ms), measured"]) for row in rows}
    off_by_more = [
        row
        for row in far
        if abs(float(row["Estimate (ms), computed"]) / float(row["Azure P95 (ms), measured"]) - 1)
        > 0.2
    ]
    europe_japan = ("westeurope", "japaneast")

    assert len(off_by_more) == 2
    assert round(measured[europe_japan] / estimate[europe_japan], 1) == 1.7


def test_page_setups_table_matches(nearest):
    assert case_mismatches(nearest) == []


def test_page_tables_not_empty(nearest):
    text = PAGE.read_text("utf-8")

    assert len(markdown_table(text, "From")) >= 10
    assert len(markdown_table(text, "Function on")) >= 6


@pytest.mark.parametrize(
    ("function_provider", "cluster_provider", "cluster_regions", "plan", "expected"),
    [
        ("aws", "aws", ["us-west-2"], "basic", "us-west-2"),
        ("gcp", "gcp", ["us-east1"], "standard", "us-east1"),
        ("gcp", "aws", ["us-east-1"], "basic", "us-east4"),
        ("aws", "gcp", ["europe-west1"], "basic", "eu-west-3"),
        ("azure", "gcp", ["asia-southeast1"], "basic", "southeastasia"),
        ("aws", "aws", ["ap-east-1", "eu-north-1"], "advanced", "ap-east-1"),
        ("azure", "azure", ["westus3"], "advanced", "westus3"),
        (" AWS ", "GCP", [" US-CENTRAL1 "], " Basic ", "us-east-2"),
    ],
    ids=[
        "aws-same-region",
        "gcp-standard",
        "gcp-to-aws",
        "aws-to-gcp",
        "azure-to-gcp-basic",
        "two-regions-tie-by-name",
        "azure-advanced",
        "case-and-spaces",
    ],
)
def test_nearest_region_cases(
    nearest, function_provider, cluster_provider, cluster_regions, plan, expected
):
    placement = nearest.nearest_region(function_provider, cluster_provider, cluster_regions, plan)

    assert placement.function_region == expected


def test_same_region_has_no_note(nearest):
    placement = nearest.nearest_region("aws", "aws", ["eu-west-2"], "basic")

    assert placement.cluster_region == "eu-west-2"
    assert placement.distance_km == 0.0
    assert placement.estimated_round_trip_ms == 0.0
    assert placement.note is None


def test_azure_basic_note_says_why(nearest):
    placement = nearest.nearest_region("azure", "aws", ["us-east-1"], "basic")

    assert placement.provider == "azure"
    assert "CockroachDB Basic has no Azure regions" in placement.note
    assert "nearest to the cluster by distance" in placement.note


def test_cross_provider_note_suggests_move(nearest):
    placement = nearest.nearest_region("gcp", "aws", ["us-east-1"], "basic")

    assert "crosses between providers" in placement.note
    assert "could share the function's region" in placement.note


def test_estimate_follows_page_formula(nearest):
    placement = nearest.nearest_region("aws", "gcp", ["us-central1"], "basic")

    assert placement.distance_km > 1000
    assert placement.estimated_round_trip_ms == round(placement.distance_km * 2 * 1.5 / 200, 1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("amazon", "aws", ["us-east-1"], "basic"), r"unknown function provider 'amazon'"),
        (("aws", "oracle", ["us-east-1"], "basic"), r"unknown cluster provider 'oracle'"),
        (("aws", "aws", ["us-east-1"], "free"), r"unknown plan 'free'"),
        (("aws", "aws", ["us-east-9"], "basic"), r"unknown AWS region 'us-east-9'"),
        (("aws", "aws", ["ap-east-1"], "basic"), r"CockroachDB Basic does not offer AWS region"),
        (("aws", "azure", ["eastus"], "standard"), r"CockroachDB Standard has no Azure regions"),
        (("aws", "aws", [], "basic"), r"non-empty list of region names"),
        (("aws", "aws", "us-east-1", "basic"), r"non-empty list of region names"),
    ],
    ids=[
        "function-provider",
        "cluster-provider",
        "plan",
        "region",
        "region-not-in-plan",
        "provider-not-in-plan",
        "no-regions",
        "string-not-list",
    ],
)
def test_bad_input_rejected(nearest, arguments, message):
    with pytest.raises(nearest.UnknownChoiceError, match=message):
        nearest.nearest_region(*arguments)


@pytest.mark.parametrize(
    ("arguments", "listed"),
    [
        (("amazon", "aws", ["us-east-1"], "basic"), "aws, azure, gcp"),
        (("aws", "aws", ["us-east-1"], "free"), "basic, standard, advanced"),
        (("aws", "aws", ["us-east-9"], "basic"), "ap-east-1, ap-northeast-1"),
        (("aws", "aws", ["ap-east-1"], "basic"), "it offers: ap-south-1, ap-southeast-1"),
        (("aws", "azure", ["eastus"], "basic"), "valid cluster providers for it: aws, gcp"),
    ],
    ids=["providers", "plans", "regions", "plan-regions", "plan-providers"],
)
def test_error_lists_valid_choices(nearest, arguments, listed):
    with pytest.raises(nearest.UnknownChoiceError) as raised:
        nearest.nearest_region(*arguments)

    assert listed in str(raised.value)


@pytest.mark.snippet(REGIONS_DATA)
@pytest.mark.parametrize(
    ("provider", "plan", "fact_id"),
    [
        ("aws", "basic", "cockroachdb.regions.basic.aws"),
        ("gcp", "basic", "cockroachdb.regions.basic.gcp"),
        ("aws", "standard", "cockroachdb.regions.basic.aws"),
        ("gcp", "standard", "cockroachdb.regions.basic.gcp"),
        ("aws", "advanced", "cockroachdb.regions.advanced.aws"),
        ("gcp", "advanced", "cockroachdb.regions.advanced.gcp"),
        ("azure", "advanced", "cockroachdb.regions.advanced.azure"),
    ],
)
def test_data_file_matches_facts(nearest, region_data, provider, plan, fact_id):
    assert regions_of(region_data, provider, plan) == fact_list(load_facts(), fact_id)


@pytest.mark.snippet(REGIONS_DATA)
def test_no_azure_region_for_basic(nearest, region_data):
    assert regions_of(region_data, "azure", "basic") == []
    assert regions_of(region_data, "azure", "standard") == []


@pytest.mark.snippet(REGIONS_DATA)
def test_data_file_checked_with_facts(nearest, region_data):
    checked = load_facts()["cockroachdb.regions.basic.aws"].checked

    assert region_data["checked"] == checked.isoformat()


@pytest.mark.snippet(REGIONS_DATA)
def test_data_file_entries_valid(nearest, region_data):
    problems = []
    for provider, entries in region_data["providers"].items():
        names = [entry["region"] for entry in entries]
        if len(names) != len(set(names)):
            problems.append(f"{provider}: a region is listed twice")
        for entry in entries:
            where = f"{provider} {entry['region']}"
            if not -90 <= entry["latitude"] <= 90 or not -180 <= entry["longitude"] <= 180:
                problems.append(f"{where}: coordinates out of range")
            if not set(entry["plans"]) <= {"basic", "standard", "advanced"} or not entry["plans"]:
                problems.append(f"{where}: plans must name basic, standard or advanced")
            if entry["location"].strip() == "":
                problems.append(f"{where}: location is empty")

    assert problems == []


class TestBrokenCopiesFail:
    """Each check above goes red when the function loses a behaviour the page describes."""

    def test_no_route_factor_breaks_table(self, snippets):
        broken = snippets.load(NEAREST_REGION, NO_ROUTE_FACTOR)

        assert round_trip_mismatches(broken) != []

    def test_first_region_only_breaks_table(self, snippets):
        broken = snippets.load(NEAREST_REGION, FIRST_CLUSTER_REGION_ONLY)

        assert case_mismatches(broken) != []

    def test_no_plan_check_accepts_region(self, snippets):
        broken = snippets.load(NEAREST_REGION, NO_PLAN_CHECK)

        placement = broken.nearest_region("aws", "aws", ["ap-east-1"], "basic")

        assert placement.function_region == "ap-east-1"

    def test_no_plan_note_breaks_table(self, snippets):
        broken = snippets.load(NEAREST_REGION, NO_CROSS_PROVIDER_NOTE)

        assert case_mismatches(broken) != []
