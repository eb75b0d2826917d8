from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable

import pytest

from tinyfleet.server.registry.store import EmbeddedStore, StoreBusyError
from tinyfleet.server.registry.thing_graphs import Registry
from tinyfleet.server.registry.validation import DescriptionInvalid

TD_JSON = "application/td+json"
DEVICE = "urn:tinyfleet:device:pi-01"


def test_register_replace_and_delete_a_device(registry: Registry, make_td: Callable[..., bytes]) -> None:
    events: list[tuple[str, str]] = []
    registry.subscribe(lambda event, thing: events.append((event, thing)))
    assert registry.put(registry.prepare(make_td(sensors=("Accelerometer",)), TD_JSON)) is True
    registration = registry.registration(DEVICE)
    assert registration is not None
    created = registration.created
    assert registry.eligible("eligible-devices sensors=sosa_extend:Accelerometer") == [DEVICE]
    # Re-registration replaces the whole graph: the accelerometer is gone, nothing is left over.
    assert registry.put(registry.prepare(make_td(sensors=("Camera",)), TD_JSON)) is False
    assert registry.eligible("eligible-devices sensors=sosa_extend:Accelerometer") == []
    assert registry.eligible("eligible-devices sensors=sosa_extend:Camera") == [DEVICE]
    assert (again := registry.registration(DEVICE)) is not None and again.created == created
    assert (document := registry.document(DEVICE)) is not None and document["sensorTypes"] == ["Camera"]
    assert registry.delete(DEVICE) is True
    assert registry.delete(DEVICE) is False
    assert registry.thing_ids() == ([], 0)
    assert events == [("thing_created", DEVICE), ("thing_updated", DEVICE), ("thing_deleted", DEVICE)]


def test_json_level_td_problems_name_their_path(registry: Registry) -> None:
    bad = {
        "@context": "https://www.w3.org/2022/wot/td/v1.1",
        "id": "not an iri",
        "title": 7,
        "securityDefinitions": {"s": {"scheme": "nosec"}},
        "security": ["missing"],
        "properties": {"t": {"forms": [{"href": "http://x", "op": "fly"}]}},
    }
    with pytest.raises(DescriptionInvalid) as caught:
        registry.prepare(json.dumps(bad).encode(), TD_JSON)
    paths = {p["path"] for p in caught.value.as_list()}
    assert paths == {"/id", "/title", "/security", "/properties/t/forms/0/op"}


def test_shacl_problems_are_listed_and_nothing_is_stored(
    registry: Registry, make_td: Callable[..., bytes]
) -> None:
    registry.put(registry.prepare(make_td(), TD_JSON))
    before = registry.graph_triples(DEVICE)
    with pytest.raises(DescriptionInvalid) as caught:
        registry.prepare(make_td(ram_kb=-1, device_class="phone"), TD_JSON)
    messages = {p["path"]: p["message"] for p in caught.value.as_list()}
    assert any(
        path.endswith("tf:ramKB") and "positive number of kilobytes" in m for path, m in messages.items()
    )
    assert any(path.endswith("tf:deviceClass") and "'phone'" in m for path, m in messages.items())
    assert registry.graph_triples(DEVICE) == before


def test_unknown_context_and_bad_json_are_refused(registry: Registry) -> None:
    with pytest.raises(DescriptionInvalid, match="not valid JSON"):
        registry.prepare(b"{nope", TD_JSON)
    td = {
        "@context": ["https://www.w3.org/2022/wot/td/v1.1", "https://evil.example/ctx"],
        "id": DEVICE,
        "title": "x",
        "securityDefinitions": {"s": {"scheme": "nosec"}},
        "security": "s",
    }
    with pytest.raises(DescriptionInvalid, match=r"unknown JSON-LD context 'https://evil\.example/ctx'"):
        registry.prepare(json.dumps(td).encode(), TD_JSON)


def test_a_triple_term_is_refused_by_name(registry: Registry) -> None:
    """RDF 1.2 Turtle parses a triple term into the description; SHACL's graph cannot hold one."""
    turtle = b"""
    @prefix td: <https://www.w3.org/2019/wot/td#> .
    <urn:tinyfleet:device:quoting> a td:Thing ; td:title "q" ;
      <urn:tinyfleet:says> <<( <urn:tinyfleet:device:quoting> td:title "q" )>> .
    """
    with pytest.raises(DescriptionInvalid, match=r"holds a triple term \(RDF 1\.2\)"):
        registry.prepare(turtle, "text/turtle")
    assert registry.document("urn:tinyfleet:device:quoting") is None


def test_turtle_with_the_long_s3n_form_gets_shortcuts_and_no_blank_nodes(registry: Registry) -> None:
    turtle = b"""
    @prefix td: <https://www.w3.org/2019/wot/td#> . @prefix ssn: <http://www.w3.org/ns/ssn/> .
    @prefix s3n: <https://w3id.org/s3n/> . @prefix ssn-system: <http://www.w3.org/ns/ssn/systems/> .
    @prefix x: <https://w3id.org/tinyml-schema/neural-network-schema/s3n_extend/> .
    @prefix se: <https://w3id.org/tinyml-schema/neural-network-schema/sosa_extend/> .
    @prefix schema: <https://schema.org/> .
    @prefix om: <http://www.ontology-of-units-of-measure.org/resource/om-2/> .
    <urn:tinyfleet:device:board> a s3n:SmartSensor ; td:title "board" ;
      ssn:hasSubSystem [ a se:Microphone ] , [ a s3n:MicroController ; s3n:hasSystemCapability [
        ssn-system:hasSystemProperty [ a x:RAM ; schema:value 256 ; schema:unitCode om:kilobyte ] ,
                                     [ a x:Flash ; schema:value 1024 ; schema:unitCode om:kilobyte ] ] ] .
    """
    registry.put(registry.prepare(turtle, "text/turtle"))
    [row] = registry.named("devices")
    assert (row["ramKB"].value, row["flashKB"].value) == ("256", "1024")
    assert registry.eligible("eligible-devices sensors=sosa_extend:Microphone") == [
        "urn:tinyfleet:device:board"
    ]
    assert not registry.store.query("ASK { GRAPH ?g { ?s ?p ?o FILTER(isBlank(?s) || isBlank(?o)) } }")


def test_liveness_is_batched_into_one_update_and_seq_recorded(
    registry: Registry, make_td: Callable[..., bytes]
) -> None:
    prepared = [registry.prepare(make_td(f"d{i}"), TD_JSON) for i in range(3)]
    registry.put_many(prepared, seq=7)
    assert registry.last_applied_seq() == 7
    seen = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    registry.set_liveness({f"urn:tinyfleet:device:d{i}": (i != 1, seen) for i in range(3)}, seq=9)
    rows = {r["device"].value: r["online"].value for r in registry.named("devices")}
    assert rows == {
        "urn:tinyfleet:device:d0": "true",
        "urn:tinyfleet:device:d1": "false",
        "urn:tinyfleet:device:d2": "true",
    }
    assert registry.last_applied_seq() == 9
    stale = {r["device"].value for r in registry.named("stale-devices", {"older_than": "PT1M"})}
    assert stale == set(rows)
    counts = registry.named("per-gateway-counts")
    assert [(r["devices"].value, r["onlineDevices"].value) for r in counts] == [("3", "2")]


def test_ttl_registrations_expire(registry: Registry, make_td: Callable[..., bytes]) -> None:
    registry.put(registry.prepare(make_td(), TD_JSON, ttl_s=60))
    assert (document := registry.document(DEVICE)) is not None and document["registration"]["ttl"] == 60
    assert registry.purge_expired() == []
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=61)
    assert registry.purge_expired(later) == [DEVICE]
    assert registry.document(DEVICE) is None


def test_on_disk_store_survives_reopen_and_refuses_a_second_writer(
    tmp_path, make_td: Callable[..., bytes]
) -> None:
    store = EmbeddedStore(tmp_path / "registry")
    registry = Registry(store)
    registry.put(registry.prepare(make_td(), TD_JSON))
    with pytest.raises(StoreBusyError, match="in use by another process"):
        EmbeddedStore(tmp_path / "registry")
    store.close()
    reopened = Registry(EmbeddedStore(tmp_path / "registry"))
    assert reopened.thing_ids() == ([DEVICE], 1)


def test_rdflib_view_of_the_same_store(make_td: Callable[..., bytes]) -> None:
    import rdflib

    store = EmbeddedStore(None)
    registry = Registry(store)
    registry.put(registry.prepare(make_td(), TD_JSON))
    dataset = store.rdflib_dataset()
    ram = rdflib.URIRef("https://w3id.org/tinyfleet#ramKB")
    assert [int(str(o)) for o in dataset.objects(rdflib.URIRef(DEVICE), ram)] == [512]
