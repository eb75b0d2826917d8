"""The eligible-devices named query (subqueries hash-joined, unused criteria left out) gives the
same rows as its plain form (one EXISTS filter per criterion, tested per device, each fact read
from the device's own graph) on generated fleets with the awkward cases: devices without sensors
or class, a sensor listed twice, a device with two RAM figures, thresholds on the boundary,
unknown sensors, classes and gateways, every combination of criteria, and stray triples about
devices in a graph that is not theirs (which must change nothing). per-gateway-counts, rewritten
the same way, gives the rows of its previous form."""

from __future__ import annotations

import itertools
import json
import random

import pyoxigraph as ox
import pytest

from tinyfleet.common.device_description import device_thing_description
from tinyfleet.ontology.catalog import parse_query_file, render
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_graphs import Registry
from tinyfleet.simulations.benchmarks.registry import ELIGIBLE_PLAIN as PLAIN_UNION

SENSORS = ("Accelerometer", "Gyroscope", "Microphone", "Camera")
SOSA_EXTEND = "https://w3id.org/tinyml-schema/neural-network-schema/sosa_extend/"
TD_JSON = "application/td+json"
PREFIXES = """
@prefix tf: <https://w3id.org/tinyfleet#> .
@prefix sosa_extend: <https://w3id.org/tinyml-schema/neural-network-schema/sosa_extend/> .
"""
#: Each in the device's own graph (as an operator's import or update could write them).
ODD = {
    "urn:tinyfleet:device:two-rams": """<urn:tinyfleet:device:two-rams> a tf:Device ;
        tf:ramKB 64, 300 ; tf:flashKB 512 ; tf:sensorType sosa_extend:Camera .""",
    "urn:tinyfleet:device:classless": """<urn:tinyfleet:device:classless> a tf:Device ;
        tf:ramKB 256 ; tf:flashKB 0 ; tf:sensorType sosa_extend:Gyroscope, sosa_extend:Accelerometer .""",
    "urn:tinyfleet:device:not-typed": "<urn:tinyfleet:device:not-typed> tf:ramKB 1000 ; tf:flashKB 1000 .",
}
#: Facts about devices in a graph that is none of theirs: no answer may change because of them.
STRAY = """
<urn:tinyfleet:device:d0> tf:sensorType sosa_extend:Camera, sosa_extend:Gyroscope ; tf:deviceClass "sbc" .
<urn:tinyfleet:device:d1> tf:ramKB 999999 ; tf:flashKB 999999 ; tf:behindGateway <urn:tinyfleet:device:gw-1> .
<urn:tinyfleet:device:not-typed> a tf:Device .
<urn:tinyfleet:device:nobody> a tf:Device ; tf:ramKB 999999 ; tf:flashKB 999999 .
"""

# The plain form (one EXISTS filter per criterion, tested per device), every fact read from the
# device's own graph: what the named query must answer.
PLAIN = parse_query_file("eligible-devices (plain, own graphs)", """\
#@ summary eligible-devices with EXISTS filters over each device's own graph
#@ param min_ram_kb decimal = 0 -- ram
#@ param min_flash_kb decimal = 0 -- flash
#@ param sensors iris = -- sensors
#@ param device_class string = -- class
#@ param gateway iris = -- gateways
SELECT ?device WHERE {
  GRAPH ?device { ?device a tf:Device ; tf:ramKB ?ramKB ; tf:flashKB ?flashKB . }
  FILTER(?ramKB >= $min_ram_kb && ?flashKB >= $min_flash_kb)
  FILTER NOT EXISTS {
    VALUES ?sensor { $sensors }
    FILTER NOT EXISTS { GRAPH ?device { ?device tf:sensorType ?sensor } }
  }
  FILTER($device_class = "" || EXISTS { GRAPH ?device { ?device tf:deviceClass $device_class } })
  FILTER(NOT EXISTS { VALUES ?g { $gateway } }
         || EXISTS { VALUES ?g { $gateway } GRAPH ?device { ?device tf:behindGateway ?g } })
}
""")


def _turtle(text: str) -> list[ox.Triple]:
    return [q.triple for q in ox.parse((PREFIXES + text).encode(), format=ox.RdfFormat.TURTLE)]


@pytest.fixture(scope="module")
def fleet() -> Registry:
    rng = random.Random(7)
    registry = Registry(EmbeddedStore(None))
    prepared = []
    for index in range(240):
        kind = rng.choice(["mcu", "sbc", "gateway"])
        behind = rng.randrange(4) if kind == "mcu" else 3  # 3: no gateway
        td = device_thing_description(
            f"urn:tinyfleet:device:d{index}",
            title=f"d{index}",
            ram_kb=rng.choice([64, 255, 256, 257, 512, 4096]),
            flash_kb=rng.choice([0, 256, 1024, 32768]),
            device_class=kind,
            sensors=tuple(rng.sample(SENSORS, rng.randint(0, len(SENSORS)))),
            gateway=f"urn:tinyfleet:device:gw-{behind}" if behind < 3 else None,
        )
        prepared.append(registry.prepare(json.dumps(td).encode(), TD_JSON))
    graphs = {device: _turtle(text) for device, text in ODD.items()}
    graphs["urn:tinyfleet:graph:stray"] = _turtle(STRAY)
    registry.put_many(prepared, extra_graphs=graphs)
    registry.set_liveness({p.thing_id: (rng.random() < 0.5, None) for p in prepared[::2]})
    return registry


UNKNOWN_SENSOR = "<urn:tinyfleet:sensor:nobody-has-this>"
SENSOR_CHOICES = [
    "",
    "sosa_extend:Camera",
    "sosa_extend:Gyroscope sosa_extend:Accelerometer",
    "sosa_extend:Camera sosa_extend:Camera",
    f"sosa_extend:Camera {UNKNOWN_SENSOR}",
    " ".join(f"sosa_extend:{s}" for s in SENSORS),
]
CLASS_CHOICES = ["", "mcu", "sbc", "toaster"]
GATEWAY_CHOICES = ["", "urn:tinyfleet:device:gw-1", "urn:tinyfleet:device:gw-0 urn:tinyfleet:device:gw-2",
                   "urn:tinyfleet:device:nowhere"]
THRESHOLDS = [{}, {"min_ram_kb": "256"}, {"min_ram_kb": "255.5", "min_flash_kb": "256"}]


def _rows(registry: Registry, text: str) -> list[str]:
    return sorted(row["device"].value for row in registry.select(text))


@pytest.mark.parametrize("sensors", SENSOR_CHOICES)
def test_the_fast_form_gives_the_rows_of_the_plain_form(fleet: Registry, sensors: str) -> None:
    nonempty = 0
    for device_class, gateway, thresholds in itertools.product(CLASS_CHOICES, GATEWAY_CHOICES, THRESHOLDS):
        params = {"sensors": sensors, "device_class": device_class, "gateway": gateway, **thresholds}
        expected = _rows(fleet, PLAIN.render(params))
        assert _rows(fleet, render("eligible-devices", params)) == expected, params
        nonempty += bool(expected)
    if UNKNOWN_SENSOR in sensors:
        assert nonempty == 0  # nobody carries it
    else:
        assert nonempty  # the fleet is varied enough that the criteria select something


def test_the_awkward_devices_are_in_the_answers(fleet: Registry) -> None:
    everyone = _rows(fleet, render("eligible-devices"))
    assert everyone.count("urn:tinyfleet:device:two-rams") == 2  # once per RAM figure, as before
    assert "urn:tinyfleet:device:not-typed" not in everyone  # typed only in a graph not its own
    assert "urn:tinyfleet:device:nobody" not in everyone  # described only in a graph not its own
    picky = {"sensors": "sosa_extend:Gyroscope sosa_extend:Accelerometer", "min_ram_kb": "256"}
    assert "urn:tinyfleet:device:classless" in _rows(fleet, render("eligible-devices", picky))
    assert "urn:tinyfleet:device:classless" not in _rows(
        fleet, render("eligible-devices", {**picky, "device_class": "mcu"})
    )


def test_stray_triples_change_the_union_but_not_the_answers(fleet: Registry) -> None:
    """What reading each device's own graph buys: over the union (the benchmark's plain form)
    the stray graph makes d1 pass any memory threshold and d0 carry a gyroscope and a camera."""
    huge = {"min_ram_kb": "500000", "min_flash_kb": "500000"}
    assert "urn:tinyfleet:device:d1" in _rows(fleet, PLAIN_UNION.render(huge))
    assert "urn:tinyfleet:device:d1" not in _rows(fleet, render("eligible-devices", huge))
    own = fleet.select(
        "SELECT ?sensor WHERE { GRAPH <urn:tinyfleet:device:d0> "
        "{ <urn:tinyfleet:device:d0> <https://w3id.org/tinyfleet#sensorType> ?sensor } }"
    )
    carries_both = {f"{SOSA_EXTEND}Gyroscope", f"{SOSA_EXTEND}Camera"} <= {r["sensor"].value for r in own}
    both = {"sensors": "sosa_extend:Gyroscope sosa_extend:Camera"}
    assert "urn:tinyfleet:device:d0" in _rows(fleet, PLAIN_UNION.render(both))
    assert ("urn:tinyfleet:device:d0" in _rows(fleet, render("eligible-devices", both))) == carries_both
    devices = {r["device"].value: r for r in fleet.named("devices")}
    assert "urn:tinyfleet:device:nobody" not in devices
    assert devices["urn:tinyfleet:device:d1"]["ramKB"].value != "999999"


GATEWAY_COUNTS_BEFORE = parse_query_file("per-gateway-counts (before)", """\
#@ summary the form before online and typed devices were subqueries of their own
SELECT ?gateway (SUM(?n) AS ?devices) (SUM(?on) AS ?onlineDevices) WHERE {
  { SELECT ?gateway (COUNT(?device) AS ?n) (0 AS ?on) WHERE {
      GRAPH ?device { ?device tf:behindGateway ?gateway } } GROUP BY ?gateway }
  UNION
  { SELECT ?gateway (0 AS ?n) (COUNT(?device) AS ?on) WHERE {
      GRAPH ?device { ?device tf:behindGateway ?gateway }
      GRAPH <urn:tinyfleet:graph:liveness> { ?device tf:online true } } GROUP BY ?gateway }
  UNION
  { SELECT (COUNT(?device) AS ?n) (0 AS ?on) WHERE {
      GRAPH ?device { ?device a tf:Device MINUS { ?device tf:behindGateway ?any } } } }
  UNION
  { SELECT (0 AS ?n) (COUNT(?device) AS ?on) WHERE {
      GRAPH ?device { ?device a tf:Device MINUS { ?device tf:behindGateway ?any } }
      GRAPH <urn:tinyfleet:graph:liveness> { ?device tf:online true } } }
}
GROUP BY ?gateway
HAVING (SUM(?n) > 0)
ORDER BY DESC(?devices) ?gateway
""")


def test_per_gateway_counts_give_the_rows_of_the_previous_form(fleet: Registry) -> None:
    def rows(text: str) -> list[tuple[str, ...]]:
        return [tuple("" if v is None else v.value for v in row.values()) for row in fleet.select(text)]

    expected = rows(GATEWAY_COUNTS_BEFORE.render())
    assert len(expected) == 4 and any(int(r[2]) > 0 for r in expected)  # 3 gateways and no gateway
    assert rows(render("per-gateway-counts")) == expected
