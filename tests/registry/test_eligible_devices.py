"""The eligible-devices named query (subqueries hash-joined, unused criteria left out) gives the
same rows as its plain form (one EXISTS filter per criterion, tested per device) on generated
fleets with the awkward cases: devices without sensors or class, a sensor listed twice or
carried in two graphs, a device with two RAM figures, thresholds on the boundary, unknown
sensors, classes and gateways, and every combination of criteria. per-gateway-counts, rewritten
the same way, gives the rows of its previous form."""

from __future__ import annotations

import itertools
import json
import random

import pyoxigraph as ox
import pytest

from tinyfleet.ontology.catalog import parse_query_file, render
from tinyfleet.server.registry.registry import Registry
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_description import device_thing_description
from tinyfleet.simulations.benchmarks.registry import ELIGIBLE_PLAIN as PLAIN

SENSORS = ("Accelerometer", "Gyroscope", "Microphone", "Camera")
TD_JSON = "application/td+json"
ODD = """
@prefix tf: <https://w3id.org/tinyfleet#> .
@prefix sosa_extend: <https://w3id.org/tinyml-schema/neural-network-schema/sosa_extend/> .
<urn:tinyfleet:device:two-rams> a tf:Device ; tf:ramKB 64, 300 ; tf:flashKB 512 ;
    tf:sensorType sosa_extend:Camera .
<urn:tinyfleet:device:classless> a tf:Device ; tf:ramKB 256 ; tf:flashKB 0 ;
    tf:sensorType sosa_extend:Gyroscope, sosa_extend:Accelerometer .
<urn:tinyfleet:device:d0> tf:sensorType sosa_extend:Camera .
<urn:tinyfleet:device:not-typed> tf:ramKB 1000 ; tf:flashKB 1000 .
"""


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
    odd = [q.triple for q in ox.parse(ODD.encode(), format=ox.RdfFormat.TURTLE)]
    registry.put_many(prepared, extra_graphs={"urn:tinyfleet:graph:odd": odd})
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
    assert "urn:tinyfleet:device:not-typed" not in everyone
    picky = {"sensors": "sosa_extend:Gyroscope sosa_extend:Accelerometer", "min_ram_kb": "256"}
    assert "urn:tinyfleet:device:classless" in _rows(fleet, render("eligible-devices", picky))
    assert "urn:tinyfleet:device:classless" not in _rows(
        fleet, render("eligible-devices", {**picky, "device_class": "mcu"})
    )


GATEWAY_COUNTS_BEFORE = parse_query_file("per-gateway-counts (before)", """\
#@ summary the form before online and typed devices were subqueries of their own
SELECT ?gateway (SUM(?n) AS ?devices) (SUM(?on) AS ?onlineDevices) WHERE {
  { SELECT ?gateway (COUNT(?device) AS ?n) (0 AS ?on) WHERE {
      ?device tf:behindGateway ?gateway } GROUP BY ?gateway }
  UNION
  { SELECT ?gateway (0 AS ?n) (COUNT(?device) AS ?on) WHERE {
      ?device tf:behindGateway ?gateway ; tf:online true } GROUP BY ?gateway }
  UNION
  { SELECT (COUNT(?device) AS ?n) (0 AS ?on) WHERE {
      ?device a tf:Device MINUS { ?device tf:behindGateway ?any } } }
  UNION
  { SELECT (0 AS ?n) (COUNT(?device) AS ?on) WHERE {
      ?device a tf:Device ; tf:online true MINUS { ?device tf:behindGateway ?any } } }
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
