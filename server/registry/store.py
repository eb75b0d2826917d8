"""Where the registry's RDF lives: an embedded on-disk Oxigraph store, or any SPARQL 1.1 server.

Both backends answer the same three calls (query, update, load) with pyoxigraph
result objects, so everything above them is backend-agnostic. A query without
FROM / FROM NAMED (or a protocol dataset, `QueryDataset`) sees the union of all
named graphs as its default graph (one graph per device and per artifact); one
with them reads the graphs it names (query_dataset). DESCRIBE answers concise
bounded descriptions through skolem IRIs (concise_description). The embedded
store runs SPARQL in Oxigraph (Rust), never in rdflib's pure-Python engine;
`rdflib_dataset()` gives an rdflib view of the same store (through oxrdflib) for
code that wants the rdflib API.

A remote store must treat its default graph as the union of named graphs
(`oxigraph serve --union-default-graph`, Fuseki `unionDefaultGraph`) when a query
names no dataset. A protocol dataset is sent on as the request's default-graph-uri /
named-graph-uri, and so are a query's FROM / FROM NAMED (as the same parameters,
which the protocol gives the same meaning): a server in union mode reads the union
whatever FROM says (`oxigraph serve --union-default-graph` does) but applies the
parameters. Its endpoints are BASE/query and BASE/update (the layout of both servers).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pyoxigraph as ox

from tinyfleet.server.registry.concise_description import with_concise_descriptions
from tinyfleet.server.registry.query_dataset import (
    QueryDataset,
    declared_dataset,
    oxigraph_options,
    read_head,
)

if TYPE_CHECKING:
    import httpx
    import rdflib

#: SELECT -> QuerySolutions, ASK -> QueryBoolean, CONSTRUCT/DESCRIBE -> triples.
QueryResult = ox.QuerySolutions | ox.QueryBoolean | ox.QueryTriples | list[ox.Triple]


class StoreError(RuntimeError):
    """The store cannot be opened or reached; the message says which and why."""


class StoreBusyError(StoreError):
    """The on-disk store is held by another process (a running server)."""


class RegistryStore(Protocol):
    location: str

    def query(
        self, sparql: str, *, timeout_s: float | None = None, dataset: QueryDataset | None = None
    ) -> QueryResult: ...

    def update(self, sparql: str) -> None: ...

    def load(self, data: bytes, rdf_format: ox.RdfFormat, *, bulk: bool = False) -> None: ...

    def close(self) -> None: ...


class EmbeddedStore:
    """An Oxigraph store in a directory (RocksDB); in memory when `path` is None (tests)."""

    def __init__(self, path: str | Path | None) -> None:
        self.location = str(path) if path is not None else "memory"
        self.path = Path(path) if path is not None else None
        try:
            self._store = ox.Store(str(path)) if path is not None else ox.Store()
        except OSError as exc:
            if "lock" in str(exc).lower():
                raise StoreBusyError(
                    f"the registry store at {path} is in use by another process (a running server?); "
                    "stop it or query it through its HTTP address (--server URL)"
                ) from exc
            raise StoreError(f"cannot open the registry store at {path}: {exc}") from exc

    @property
    def oxigraph(self) -> ox.Store:
        return self._store

    def reopen(self) -> None:
        """Reopen the on-disk database in place, so every holder of this store sees the new handle.

        RocksDB keeps refusing writes after one failed for lack of space until the
        database is reopened. The stuck handle is first replaced by a read-only one
        (queries go on; it needs no space), which closes the stuck one as soon as no
        running query holds it; then the read-write open is tried. If that fails (the
        disk is still full, or a query still holds the old handle), the read-only
        handle stays and the OSError propagates: the caller tries again later.
        In memory there is nothing on disk to recover.
        """
        if self.path is None:
            return
        self._store = ox.Store.read_only(str(self.path))
        self._store = ox.Store(str(self.path))

    def query(
        self, sparql: str, *, timeout_s: float | None = None, dataset: QueryDataset | None = None
    ) -> QueryResult:
        # Oxigraph cannot interrupt a query in-process: this is for trusted server-side queries.
        # Client queries with a deadline run in worker processes that can be killed (query_workers).
        del timeout_s
        return query_oxigraph(self._store, sparql, dataset)

    def update(self, sparql: str) -> None:
        self._store.update(sparql)

    def load(self, data: bytes, rdf_format: ox.RdfFormat, *, bulk: bool = False) -> None:
        if bulk:
            self._store.bulk_load(data, format=rdf_format)
        else:
            self._store.load(data, format=rdf_format)

    def rdflib_dataset(self) -> rdflib.Dataset:
        """An rdflib Dataset over this very store (oxrdflib), union of graphs as default."""
        import rdflib
        from oxrdflib import OxigraphStore

        return rdflib.Dataset(store=OxigraphStore(store=self._store), default_union=True)

    def close(self) -> None:
        self._store.flush()
        del self._store


class RemoteStore:
    """A SPARQL 1.1 Query + Update service over HTTP.

    `RemoteStore(BASE)` is a dataset server (BASE/query and BASE/update: Oxigraph,
    Fuseki); `RemoteStore.endpoint(URL, token)` is one protocol endpoint for both,
    such as a running tinyfleet server's /sparql (updates need its admin token).
    """

    def __init__(
        self,
        base_url: str,
        *,
        query_url: str | None = None,
        update_url: str | None = None,
        token: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        import httpx

        self.location = base_url.rstrip("/")
        self._query_url = query_url or f"{self.location}/query"
        self._update_url = update_url or f"{self.location}/update"
        self._timeout_s = timeout_s
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)

    @classmethod
    def endpoint(cls, url: str, token: str | None = None, *, timeout_s: float = 30.0) -> RemoteStore:
        return cls(url, query_url=url, update_url=url, token=token, timeout_s=timeout_s)

    def query(
        self, sparql: str, *, timeout_s: float | None = None, dataset: QueryDataset | None = None
    ) -> QueryResult:
        head = read_head(sparql)
        if head.dataset_clauses and not (dataset and dataset.given):
            dataset = declared_dataset(head)  # a server in union mode reads the union whatever FROM says
        return with_concise_descriptions(head, sparql, lambda text: self._query(text, timeout_s, dataset))

    def _query(self, sparql: str, timeout_s: float | None, dataset: QueryDataset | None) -> QueryResult:
        import httpx

        accept = "application/sparql-results+json, application/n-triples;q=0.9"
        graphs = dataset or QueryDataset()
        params = {"default-graph-uri": graphs.default_graphs, "named-graph-uri": graphs.named_graphs}
        try:
            response = self._client.post(
                self._query_url,
                params=params,
                content=sparql.encode("utf-8"),
                headers={"content-type": "application/sparql-query", "accept": accept},
                timeout=timeout_s or self._timeout_s,
            )
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"the SPARQL server at {self.location} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise StoreError(f"cannot reach the SPARQL server at {self.location}: {exc}") from exc
        self._raise_for(response, "query")
        media = response.headers.get("content-type", "").split(";")[0].strip()
        if media == "application/n-triples":
            return _triples(response.content)
        return ox.parse_query_results(response.content, format=ox.QueryResultsFormat.JSON)

    def update(self, sparql: str) -> None:
        import httpx

        try:
            response = self._client.post(
                self._update_url,
                content=sparql.encode("utf-8"),
                headers={"content-type": "application/sparql-update"},
            )
        except httpx.HTTPError as exc:
            raise StoreError(f"cannot reach the SPARQL server at {self.location}: {exc}") from exc
        self._raise_for(response, "update")

    def load(self, data: bytes, rdf_format: ox.RdfFormat, *, bulk: bool = False) -> None:
        """Sent as INSERT DATA updates of bounded size (any SPARQL 1.1 server accepts them)."""
        del bulk
        from tinyfleet.server.registry.sparql_updates import insert_data_chunks

        for update in insert_data_chunks(ox.parse(data, format=rdf_format)):
            self.update(update)

    def close(self) -> None:
        self._client.close()

    def _raise_for(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status >= 400:
            detail = response.text.strip()[:500]
            if status == 400:
                raise SyntaxError(f"the SPARQL server rejected the {what}: {detail}")
            raise StoreError(f"the SPARQL server at {self.location} answered {status} to a {what}: {detail}")


def query_oxigraph(
    store: ox.Store, sparql: str, dataset: QueryDataset | None = None, *, limit: int | None = None
) -> QueryResult:
    """A query on an Oxigraph store, reading the dataset `query_dataset` chooses; a DESCRIBE
    stops following skolem IRIs past `limit` triples."""
    head = read_head(sparql)
    options = oxigraph_options(head, dataset)
    return with_concise_descriptions(head, sparql, lambda text: store.query(text, **options), limit=limit)


def _triples(data: bytes) -> list[ox.Triple]:
    return [quad.triple for quad in ox.parse(data, format=ox.RdfFormat.N_TRIPLES)]


def open_store(data_dir: str | Path | None = None, registry_url: str | None = None) -> RegistryStore:
    """The remote store when a URL is given, else the embedded one under DATA_DIR/registry."""
    if registry_url:
        return RemoteStore(registry_url)
    if data_dir is None:
        return EmbeddedStore(None)
    path = Path(data_dir) / "registry"
    path.parent.mkdir(parents=True, exist_ok=True)
    return EmbeddedStore(path)
