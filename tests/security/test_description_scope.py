"""Issue 10, row 3: a description speaks only for its device. A real coordinator refuses a
registration that states facts about another device (the TD `rdfs:seeAlso {"@id": other,
"ramKB": ...}` form and the Turtle form, over gRPC Register and HTTP PUT/PATCH /things), naming the
offending triple, and the other device's facts and eligibility stay what its own description says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from registry.coordinator_process import (
    ADMIN,
    TD_JSON,
    TURTLE,
    coordinator,
    eligible,
    ram_stated_anywhere,
    register,
    select,
    things_url,
    validation_errors,
    wait_for,
)

from tinyfleet.common.device_description import device_thing_description
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.simulations.local_fleet import LocalFleet

VICTIM = "urn:tinyfleet:device:victim"
ATTACKER = "urn:tinyfleet:device:attacker"
RDFS = "http://www.w3.org/2000/01/rdf-schema#"
INJECTED = f'<{VICTIM}> <https://w3id.org/tinyfleet#ramKB> "999999"'


def _td(device_id: str, ram_kb: int) -> dict[str, Any]:
    td = device_thing_description(device_id, title=device_id, ram_kb=ram_kb, flash_kb=1024)
    td["@context"].append({"rdfs": RDFS})
    return td


def _injecting(form: str) -> tuple[bytes, str]:
    if form == "td-json":
        td = _td(ATTACKER, 64)
        td["rdfs:seeAlso"] = {"@id": VICTIM, "ramKB": 999999}
        return json.dumps(td).encode(), TD_JSON
    turtle = f"""@prefix tf: <https://w3id.org/tinyfleet#> . @prefix td: <https://www.w3.org/2019/wot/td#> .
    <{ATTACKER}> a tf:Device ; td:title "attacker" ; tf:ramKB 64 ; tf:flashKB 1024 .
    <{VICTIM}> tf:ramKB 999999 .
    """
    return turtle.encode(), TURTLE


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    with coordinator(tmp_path_factory.mktemp("scope")) as running:
        answer = register(running.address, json.dumps(_td(VICTIM, 128)).encode())
        assert isinstance(answer, fleet_pb2.RegisterResponse), answer
        wait_for(lambda: ram_stated_anywhere(running.http_address, VICTIM) == ["128"])
        yield running


def _assert_names_the_injected_triple(errors: list[dict[str, str]]) -> None:
    [error] = errors  # one offending triple, one problem
    assert error["path"] == f"<{VICTIM}> tf:ramKB"
    assert INJECTED in error["message"] and f"not this device <{ATTACKER}>" in error["message"]


def _assert_victim_unchanged(http: str) -> None:
    assert ram_stated_anywhere(http, VICTIM) == ["128"]  # no graph says 999999 about it
    assert VICTIM in eligible(http, min_ram_kb="100")
    assert VICTIM not in eligible(http, min_ram_kb="500000")


def _attacker_stored(http: str) -> bool:
    return bool(select(http, f"SELECT ?p WHERE {{ GRAPH <{ATTACKER}> {{ ?s ?p ?o }} }} LIMIT 1"))


@pytest.mark.parametrize("form", ["td-json", "turtle"])
def test_register_refuses_a_description_with_triples_about_another_device(
    fleet: LocalFleet, form: str
) -> None:
    description, media_type = _injecting(form)
    answer = register(fleet.address, description, media_type)
    assert isinstance(answer, grpc.RpcError), "the injecting description was accepted"
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert INJECTED in (answer.details() or "")
    _assert_names_the_injected_triple(validation_errors(answer))
    assert not _attacker_stored(fleet.http_address)
    _assert_victim_unchanged(fleet.http_address)


@pytest.mark.parametrize("form", ["td-json", "turtle"])
def test_http_put_refuses_a_description_with_triples_about_another_device(
    fleet: LocalFleet, form: str
) -> None:
    description, media_type = _injecting(form)
    response = httpx.put(
        things_url(fleet.http_address, ATTACKER), content=description,
        headers={**ADMIN, "content-type": media_type}, timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    _assert_names_the_injected_triple(response.json()["validationErrors"])
    assert not _attacker_stored(fleet.http_address)
    _assert_victim_unchanged(fleet.http_address)


def test_http_patch_cannot_add_triples_about_another_device(fleet: LocalFleet) -> None:
    url = things_url(fleet.http_address, "urn:tinyfleet:device:patcher")
    td = _td("urn:tinyfleet:device:patcher", 64)
    created = httpx.put(url, content=json.dumps(td), headers={**ADMIN, "content-type": TD_JSON}, timeout=60)
    assert created.status_code == 201, created.text
    patch = {"rdfs:seeAlso": {"@id": VICTIM, "ramKB": 999999}}
    response = httpx.patch(
        url, content=json.dumps(patch), headers={**ADMIN, "content-type": "application/merge-patch+json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    [error] = response.json()["validationErrors"]
    assert error["path"] == f"<{VICTIM}> tf:ramKB" and INJECTED in error["message"]
    _assert_victim_unchanged(fleet.http_address)


def test_nodes_under_the_device_are_its_own_but_a_longer_sibling_id_is_not(fleet: LocalFleet) -> None:
    """IRIs that continue the device's IRI with '#', '/' or ':' are nodes of its own description;
    an IRI that merely starts with the same characters (pi-1 and pi-10) is another device."""
    device = "urn:tinyfleet:device:pi-1"
    td = _td(device, 64)
    td["rdfs:seeAlso"] = [
        {"@id": f"{device}#ram", "rdfs:label": "fragment"},
        {"@id": f"{device}:board", "rdfs:label": "urn component"},
        {"@id": f"{device}/sensor", "rdfs:label": "path segment"},
        {"rdfs:label": "a blank node"},
    ]
    answer = register(fleet.address, json.dumps(td).encode())
    assert isinstance(answer, fleet_pb2.RegisterResponse), answer

    td["rdfs:seeAlso"] = {"@id": f"{device}0", "ramKB": 999999}
    refused = register(fleet.address, json.dumps(td).encode())
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    [error] = validation_errors(refused)
    assert error["path"] == f"<{device}0> tf:ramKB"


def test_a_refusal_naming_many_long_triples_still_reaches_the_client(fleet: LocalFleet) -> None:
    """The problems travel in gRPC trailers (8 KiB by default): they are cut to fit, and the
    client still gets INVALID_ARGUMENT with the first triples named and the rest counted."""
    long_ids = [f"urn:tinyfleet:device:{'x' * 400}-{n}" for n in range(200)]
    turtle = f"""@prefix tf: <https://w3id.org/tinyfleet#> . @prefix td: <https://www.w3.org/2019/wot/td#> .
    <{ATTACKER}> a tf:Device ; td:title "attacker" ; tf:ramKB 64 ; tf:flashKB 1024 .
    """ + "".join(f"<{other}> tf:ramKB 999999 .\n" for other in long_ids)
    answer = register(fleet.address, turtle.encode(), TURTLE)
    assert isinstance(answer, grpc.RpcError) and answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    errors = validation_errors(answer)
    first = errors[0]["path"]
    assert first.startswith("<urn:tinyfleet:device:xxx") and first.endswith("\u2026 tf:ramKB")
    assert errors[-1]["path"] == "" and errors[-1]["message"].startswith("and ")
    assert len(json.dumps(errors)) <= 4096 and len(answer.details() or "") <= 1000
