"""DESCRIBE answers a resource's concise bounded description, through skolem IRIs too.

A concise bounded description (https://www.w3.org/submission/CBD/) is a resource's
triples plus, for every blank node they reach as object, that node's description,
recursively. Oxigraph's DESCRIBE follows blank nodes, but the registry keeps none:
they were skolemized (sparql_updates) and the description would stop at the first
of them (a device's sensors, its properties' forms). So the skolem IRIs a DESCRIBE
reaches are described in turn, by DESCRIBE queries with the original's prologue and
dataset clauses (and the same protocol dataset, applied by `run`), until none is left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pyoxigraph as ox

from tinyfleet.server.registry.query_dataset import QueryHead
from tinyfleet.server.registry.sparql_updates import is_skolem

if TYPE_CHECKING:
    from tinyfleet.server.registry.store import QueryResult

#: Skolem IRIs described per follow-up query.
_BATCH = 256


def with_concise_descriptions(
    head: QueryHead, text: str, run: Callable[[str], QueryResult], *, limit: int | None = None
) -> QueryResult:
    """`run(text)`, and for a DESCRIBE the descriptions of the skolem IRIs it reaches. Stops
    following once there are more than `limit` triples (the caller refuses such an answer)."""
    result = run(text)
    if head.form != "DESCRIBE" or not isinstance(result, ox.QueryTriples | list):
        return result
    triples: list[ox.Triple] = []
    seen: set[ox.Triple] = set()
    asked: set[ox.NamedNode] = set()

    def add(found: QueryResult) -> None:
        if not isinstance(found, ox.QueryTriples | list):
            raise TypeError(f"a DESCRIBE answered {type(found).__name__}, not triples")
        for triple in found:
            if triple not in seen:
                seen.add(triple)
                triples.append(triple)

    add(result)
    del result  # pyoxigraph results are dropped in the thread that made them
    while limit is None or len(triples) <= limit:
        described = {t.subject for t in triples}
        pending = sorted(
            {t.object for t in triples if is_skolem(t.object)} - described - asked, key=str
        )[:_BATCH]
        if not pending:
            break
        asked.update(pending)
        follow = f"{head.prologue}DESCRIBE {' '.join(map(str, pending))} {' '.join(head.dataset_clauses)}"
        add(run(follow))
    return triples
