"""The registry's HTTP surface in one place: routes to mount on the daemon's app, or a standalone app.

`registry_routes` is what the coordinator's HTTP app mounts (/sparql,
/things..., /search/sparql, /.well-known/wot, /events); `registry_app` wraps
the same routes in a Starlette app whose lifespan runs the expiry purge and
stops the SPARQL query workers. Both SPARQL endpoints share one set of query
workers, so the concurrency bound is the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.routing import Route

from tinyfleet.server.http.directory import ThingWriter, directory_routes, purge_loop
from tinyfleet.server.http.registry_access import Access
from tinyfleet.server.http.sparql import SparqlOptions, sparql_routes
from tinyfleet.server.registry.events import EventHub
from tinyfleet.server.registry.query_workers import QueryWorkers
from tinyfleet.server.registry.thing_graphs import Registry


def registry_routes(
    registry: Registry,
    hub: EventHub,
    *,
    writer: ThingWriter | None = None,
    access: Access | None = None,
    queries: QueryWorkers,
    sparql: SparqlOptions | None = None,
    apply_update: Callable[[str], None] | None = None,
) -> list[Route]:
    """`queries` (from `sparql.query_workers`) runs both endpoints' queries; the caller closes it
    when it stops, so running queries end at once."""
    access = access or Access()
    sparql = sparql or SparqlOptions()
    return [
        *sparql_routes(
            registry.store,
            access=access,
            timeout_s=sparql.timeout_s,
            max_rows=sparql.max_rows,
            queries=queries,
            apply_update=apply_update,
        ),
        *directory_routes(
            registry,
            hub,
            writer=writer,
            access=access,
            query_timeout_s=sparql.timeout_s,
            max_rows=sparql.max_rows,
            queries=queries,
        ),
    ]


def registry_app(
    registry: Registry,
    *,
    access: Access | None = None,
    sparql: SparqlOptions | None = None,
    purge_interval_s: float = 30.0,
) -> Starlette:
    hub = EventHub()
    queries = (sparql or SparqlOptions()).query_workers(registry.store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(purge_loop(registry, interval_s=purge_interval_s))
        try:
            yield
        finally:
            queries.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = Starlette(
        routes=registry_routes(registry, hub, access=access, sparql=sparql, queries=queries),
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.event_hub = hub
    return app
