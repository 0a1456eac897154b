"""Pick the cloud region to deploy a function in, nearest to its CockroachDB Cloud cluster.

The regions, the CockroachDB Cloud plans that offer each one, and an approximate point for
each location come from regions.json next to this file, which names its sources and the
date they were checked. Distances are great-circle distances between those points, and the
round-trip time is an estimate derived from the distance, not a measurement.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA_FILE = Path(__file__).with_name("regions.json")
PROVIDER_NAMES = {"aws": "AWS", "gcp": "GCP", "azure": "Azure"}
PLAN_NAMES = {
    "basic": "CockroachDB Basic",
    "standard": "CockroachDB Standard",
    "advanced": "CockroachDB Advanced",
}

EARTH_RADIUS_KM = 6371.0
# Light in optical fibre covers about 200 km per millisecond (two thirds of its speed in
# a vacuum).
FIBRE_KM_PER_MS = 200.0
# Assumed ratio of the cable route to the great-circle distance. Cables follow coasts,
# roads and sea beds, so the route is longer than the straight line.
ROUTE_FACTOR = 1.5


class UnknownChoiceError(ValueError):
    """A provider, plan or region is not in regions.json; the message lists the valid ones."""


@dataclass(frozen=True)
class Region:
    """A cloud region, the location it is named after, and the plans that offer it."""

    provider: str
    name: str
    location: str
    latitude: float
    longitude: float
    plans: frozenset[str]


@dataclass(frozen=True)
class Placement:
    """The region chosen for the function and how far it is from the cluster."""

    provider: str
    function_region: str
    cluster_region: str
    distance_km: float
    estimated_round_trip_ms: float
    # Reason the choice is a compromise, or None when the function shares the cluster's region.
    note: str | None


@cache
def load_regions(path: Path = DATA_FILE) -> dict[str, dict[str, Region]]:
    """Read regions.json into {provider: {region name: Region}}."""
    document = json.loads(path.read_text("utf-8"))
    regions: dict[str, dict[str, Region]] = {}
    for provider, entries in document["providers"].items():
        regions[provider] = {
            entry["region"]: Region(
                provider,
                entry["region"],
                entry["location"],
                float(entry["latitude"]),
                float(entry["longitude"]),
                frozenset(entry["plans"]),
            )
            for entry in entries
        }
    return regions


def great_circle_km(first: Region, second: Region) -> float:
    """Return the haversine distance between two regions' points, in kilometres."""
    latitude_1 = math.radians(first.latitude)
    latitude_2 = math.radians(second.latitude)
    delta_latitude = latitude_2 - latitude_1
    delta_longitude = math.radians(second.longitude - first.longitude)

    haversine = (
        math.sin(delta_latitude / 2) ** 2
        + math.cos(latitude_1) * math.cos(latitude_2) * math.sin(delta_longitude / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(haversine))


def estimated_round_trip_ms(distance_km: float) -> float:
    """Estimate the network round trip over a distance: there and back along the cable."""
    return 2 * distance_km * ROUTE_FACTOR / FIBRE_KM_PER_MS


def _choose(value: str, valid: Sequence[str], what: str) -> str:
    key = value.strip().lower()
    if key not in valid:
        raise UnknownChoiceError(f"unknown {what} {value!r}; valid choices: {', '.join(valid)}")
    return key


def _cluster_region(
    regions: dict[str, dict[str, Region]], provider: str, name: str, plan: str
) -> Region:
    known = regions[provider]
    key = name.strip().lower()
    if key not in known:
        raise UnknownChoiceError(
            f"unknown {PROVIDER_NAMES[provider]} region {name!r}; "
            f"valid choices: {', '.join(sorted(known))}"
        )

    region = known[key]
    if plan not in region.plans:
        offered = sorted(entry.name for entry in known.values() if plan in entry.plans)
        raise UnknownChoiceError(
            f"{PLAN_NAMES[plan]} does not offer {PROVIDER_NAMES[provider]} region {name!r}; "
            f"it offers: {', '.join(offered)}"
        )
    return region


def _offers_plan(regions: dict[str, dict[str, Region]], provider: str, plan: str) -> bool:
    return any(plan in region.plans for region in regions[provider].values())


def _explain(
    function_provider: str,
    cluster_provider: str,
    plan: str,
    regions: dict[str, dict[str, Region]],
) -> str | None:
    # With one provider the cluster's own region is a candidate at distance 0, so the
    # function shares it and there is nothing to explain.
    if function_provider == cluster_provider:
        return None

    function_name = PROVIDER_NAMES[function_provider]
    cluster_name = PROVIDER_NAMES[cluster_provider]

    if not _offers_plan(regions, function_provider, plan):
        return (
            f"{PLAN_NAMES[plan]} has no {function_name} regions, so the cluster runs on "
            f"{cluster_name} and every query crosses between providers; this is the "
            f"{function_name} region nearest to the cluster by distance"
        )
    return (
        f"the cluster runs on {cluster_name}, so every query crosses between providers; "
        f"{PLAN_NAMES[plan]} also offers {function_name} regions, and a cluster there could "
        "share the function's region"
    )


def nearest_region(
    function_provider: str,
    cluster_provider: str,
    cluster_regions: Sequence[str],
    plan: str = "basic",
) -> Placement:
    """Return the function_provider region nearest to any of the cluster's regions.

    Raises UnknownChoiceError, listing the valid values, for an unknown provider or plan,
    an unknown cluster region, or a cluster region that the plan does not offer.
    """
    regions = load_regions()
    providers = sorted(regions)
    function_provider = _choose(function_provider, providers, "function provider")
    cluster_provider = _choose(cluster_provider, providers, "cluster provider")
    plan = _choose(plan, list(PLAN_NAMES), "plan")

    if isinstance(cluster_regions, str) or not cluster_regions:
        raise UnknownChoiceError(
            "cluster_regions must be a non-empty list of region names, such as ['us-east-1']"
        )
    if not _offers_plan(regions, cluster_provider, plan):
        offering = [name for name in providers if _offers_plan(regions, name, plan)]
        raise UnknownChoiceError(
            f"{PLAN_NAMES[plan]} has no {PROVIDER_NAMES[cluster_provider]} regions; "
            f"valid cluster providers for it: {', '.join(offering)}"
        )
    cluster = [_cluster_region(regions, cluster_provider, name, plan) for name in cluster_regions]

    # Sorting by name first makes ties, such as two regions in one city, come out the same
    # way on every run.
    candidates = sorted(regions[function_provider].values(), key=lambda region: region.name)
    distance, function_region, cluster_region = min(
        (
            (great_circle_km(candidate, target), candidate, target)
            for candidate in candidates
            for target in cluster
        ),
        key=lambda choice: (
            choice[0],
            # At equal distance, the cluster's own region of the same provider wins.
            (choice[1].provider, choice[1].name) != (choice[2].provider, choice[2].name),
        ),
    )

    return Placement(
        provider=function_provider,
        function_region=function_region.name,
        cluster_region=cluster_region.name,
        distance_km=round(distance, 1),
        estimated_round_trip_ms=round(estimated_round_trip_ms(distance), 1),
        note=_explain(function_provider, cluster_provider, plan, regions),
    )
