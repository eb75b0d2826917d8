"""The SERVICE/LOAD check reads escapes as both parsers do: rdflib expands \\u escapes before
parsing, Oxigraph only inside strings and IRIs, so a quote written as an escape must not let one
parser run what the other took for a comment (an anonymous SSRF found by probing the endpoint)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pyoxigraph as ox
import pytest

from tinyfleet.server.registry.service_policy import ServiceNotAllowed, ServicePolicy


@pytest.fixture
def listener() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []

    class Record(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(500)
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


QUERIES = [
    'SELECT * WHERE {{ BIND("\\u0022 AS ?y) # " AS ?x) SERVICE <{url}/q> {{ ?s ?p ?o }}\n}}',
    "SELECT * WHERE {{ BIND('a\\u0027 AS ?y) # ' AS ?x) SERVICE <{url}/q> {{ ?s ?p ?o }}\n}}",
    'SELECT * WHERE {{ BIND("\\U00000022 AS ?y) # " AS ?x) SERVICE <{url}/q> {{ ?s ?p ?o }}\n}}',
]
UPDATES = [
    'INSERT DATA {{ <urn:a> <urn:b> "\\u0022 }} # " }} ; LOAD <{url}/u>\n; INSERT DATA {{ <urn:c> <urn:d> 1}}'
]


@pytest.mark.parametrize("template", QUERIES)
def test_a_service_hidden_behind_an_escaped_quote_is_refused(
    listener: tuple[str, list[str]], template: str
) -> None:
    url, hits = listener
    query = template.format(url=url)
    with pytest.raises(ServiceNotAllowed, match="not allowed") as refused:
        ServicePolicy().check_query(query)
    # named, or (rdflib's grammar stumbles on '#' inside a string before SERVICE) unreadable
    assert f"SERVICE <{url}/q>" in str(refused.value) or "could not be parsed" in str(refused.value)
    # the text is what Oxigraph would run: it does call out (so the check above is what stops it)
    with pytest.raises(OSError):
        list(ox.Store().query(query))  # type: ignore[arg-type]
    assert hits == ["/q"]


@pytest.mark.parametrize("template", UPDATES)
def test_a_load_hidden_behind_an_escaped_quote_is_refused(
    listener: tuple[str, list[str]], template: str
) -> None:
    url, hits = listener
    with pytest.raises(ServiceNotAllowed, match=f"LOAD <{url}/u> is not allowed"):
        ServicePolicy().check_update(template.format(url=url))
    assert hits == []


def test_escapes_in_plain_data_still_pass() -> None:
    policy = ServicePolicy()
    policy.check_query('SELECT * WHERE { ?s ?p "caf\\u00e9 service desk" }')
    policy.check_update('INSERT DATA { <urn:a> <urn:note> "payload \\u0022quoted\\u0022" }')
