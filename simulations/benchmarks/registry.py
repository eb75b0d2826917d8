"""Registry benchmark: registration throughput and query latency at fleet scale, vs rdflib.

    python -m tinyfleet.simulations.benchmarks.registry --devices 1000,10000,100000 [--json PATH]

Per fleet size N, on an on-disk Oxigraph store in a temporary directory:
N - K synthetic device TDs (plus 50 models and deployments on 30% of devices)
go in through the bulk loader; then K more are registered through the registry
in-process (JSON-LD parse, TD checks, normalization, SHACL, one SPARQL Update per
registration; and again in batches of 200). Then the median latency of: the
compatible-models point query, a selective fleet filter, the eligible-devices
named query with a job's criteria, a GROUP BY per gateway, devices without a
deployment (NOT EXISTS, MINUS, OPTIONAL/!BOUND), and a single-device
re-registration. rdflib's in-memory Dataset runs the same queries on the same
quads up to --rdflib-max devices; beyond that it is not run (loading alone takes
minutes) and the table says so. A query given in several equivalent forms is
timed in each on both engines; each engine's fastest form counts and is named,
and every form's figure is in the table and the JSON. Every form must give the
same answers (rows compared value by value) on each engine, and both engines the
same answers, or the benchmark stops. Finally a real coordinator
(`tinyfleet server start` on 127.0.0.1, SQLite or --db, on this very store) takes
--grpc-registrations new devices from each number of concurrent gRPC clients in
--clients (each device with its own key and an enrollment token: signature,
SHACL, the group commit in SQL, and the projector into the store), then as many
Connect handshakes from each number of clients, and a few runaway SPARQL queries
whose CPU must stop at their deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pyoxigraph as ox
import sqlalchemy as sa

from tinyfleet.common.device_description import device_thing_description
from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.ontology import sparql_prologue
from tinyfleet.ontology.catalog import parse_query_file, render
from tinyfleet.server.database import default_url
from tinyfleet.server.registry import sparql_updates
from tinyfleet.server.registry.normalize import normalize_models
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_graphs import Registry
from tinyfleet.simulations.benchmarks.process_cpu import RUNAWAY, deadline_to_cpu_stop
from tinyfleet.simulations.benchmarks.results_file import RunWatch, module_command, write_results

SENSORS = ("Accelerometer", "Gyroscope", "Magnetometer", "Microphone", "Camera", "Thermometer", "Hygrometer")
MODELS = 50
TD_JSON = "application/td+json"
#: Runaway queries whose deadline-to-CPU-stop is measured per coordinator.
RUNAWAY_REPEATS = 3
T = TypeVar("T")


def _selective(body: str) -> str:
    """One form of the selective fleet filter (mcu, >= 256 kB RAM, gyroscope and accelerometer)."""
    return f"{sparql_prologue()}\nSELECT ?device WHERE {{\n{body}\n}}\nORDER BY ?device"


# Each sensor pattern in its own subquery: Oxigraph hash-joins the two ~20 % scans instead of
# probing the index once per gyroscope device for its accelerometer (one RocksDB seek each).
_SENSORS_HASH_JOINED = """\
  { SELECT ?device WHERE { ?device tf:sensorType sosa_extend:Gyroscope } }
  { SELECT ?device WHERE { ?device tf:sensorType sosa_extend:Accelerometer } }"""

# The question a job's eligibility asks, written by hand most selective pattern first.
SELECTIVE = _selective("""\
  ?device tf:sensorType sosa_extend:Gyroscope .
  ?device tf:sensorType sosa_extend:Accelerometer .
  ?device tf:deviceClass "mcu" .
  ?device tf:ramKB ?ramKB .
  FILTER(?ramKB >= 256)""")

# The sensors hash-joined, class and RAM probed per device. rdflib is several times slower on
# this and the forms below, so each engine is timed on every form and its fastest one is
# reported (the table names it).
SELECTIVE_HASH_JOIN = _selective(_SENSORS_HASH_JOINED + """
  ?device tf:deviceClass "mcu" .
  ?device tf:ramKB ?ramKB .
  FILTER(?ramKB >= 256)""")

# The sensors hash-joined, the class and RAM read into variables and tested in one FILTER: with
# the literal in the pattern Oxigraph may start from the ~70 % "mcu" range and probe from there;
# with a variable it probes only the ~4 % of devices carrying both sensors.
SELECTIVE_FILTERED = _selective(_SENSORS_HASH_JOINED + """
  ?device tf:deviceClass ?class ; tf:ramKB ?ramKB .
  FILTER(?ramKB >= 256 && ?class = "mcu")""")

# Every criterion its own subquery: Oxigraph scans each one once (four ~20 % index ranges) and
# hash-joins them on ?device, the way the eligible-devices named query is written; rdflib's
# engine joins subqueries by nested loops and is far slower on this form.
SELECTIVE_SUBQUERIES = _selective(_SENSORS_HASH_JOINED + """
  { SELECT ?device WHERE { ?device tf:deviceClass "mcu" } }
  { SELECT ?device WHERE { ?device tf:ramKB ?ramKB . FILTER(?ramKB >= 256) } }""")

# Devices without a deployment, in the three ways SPARQL can say it. ?device is bound on both
# sides, so they mean the same; the benchmark checks they give the same answer on each engine.
# Oxigraph evaluates FILTER NOT EXISTS and OPTIONAL/!BOUND with one index probe per device, and
# MINUS as one hash anti-join; rdflib evaluates MINUS with a nested loop over both sides.
ANTI_JOIN_BODIES = {
    "NOT EXISTS": "FILTER NOT EXISTS { ?deployment tf:deployedOn ?device }",
    "MINUS": "MINUS { ?deployment tf:deployedOn ?device }",
    "OPTIONAL + !BOUND": "OPTIONAL { ?deployment tf:deployedOn ?device } FILTER(!BOUND(?deployment))",
}
ANTI_JOINS = {
    form: sparql_prologue()
    + f"SELECT (COUNT(?device) AS ?undeployed) WHERE {{\n  ?device a tf:Device .\n  {body}\n}}"
    for form, body in ANTI_JOIN_BODIES.items()
}

# eligible-devices as it was first written: one EXISTS filter per criterion, tested per device.
# The shipped named query must give the same rows (tests/registry/test_eligible_devices.py).
ELIGIBLE_PLAIN = parse_query_file(
    "eligible-devices (plain)",
    """\
#@ summary eligible-devices with EXISTS filters
#@ param min_ram_kb decimal = 0 -- ram
#@ param min_flash_kb decimal = 0 -- flash
#@ param sensors iris = -- sensors
#@ param device_class string = -- class
#@ param gateway iris = -- gateways
SELECT ?device WHERE {
  ?device a tf:Device ; tf:ramKB ?ramKB ; tf:flashKB ?flashKB .
  FILTER(?ramKB >= $min_ram_kb && ?flashKB >= $min_flash_kb)
  FILTER NOT EXISTS {
    VALUES ?sensor { $sensors }
    FILTER NOT EXISTS { ?device tf:sensorType ?sensor }
  }
  FILTER($device_class = "" || EXISTS { ?device tf:deviceClass $device_class })
  FILTER(NOT EXISTS { VALUES ?g { $gateway } }
         || EXISTS { VALUES ?g { $gateway } ?device tf:behindGateway ?g })
}
""",
)


def device_td(index: int, rng: random.Random, gateways: int) -> dict[str, Any]:
    kind = rng.choices(["mcu", "sbc", "gateway"], weights=[70, 25, 5])[0]
    if kind == "mcu":
        ram, flash = rng.choice([64, 128, 192, 256, 512]), rng.choice([256, 512, 1024, 2048])
    else:
        ram, flash = rng.choice([512_000, 1_000_000, 4_000_000]), rng.choice([16_000_000, 32_000_000])
    sensors = tuple(sorted(rng.sample(SENSORS, rng.randint(0, 3))))
    gateway = f"urn:tinyfleet:device:gw-{rng.randrange(gateways)}" if kind == "mcu" else None
    return device_thing_description(
        f"urn:tinyfleet:device:n{index}",
        title=f"node {index}",
        ram_kb=ram,
        flash_kb=flash,
        device_class=kind,
        cpu="cortex-m4" if kind == "mcu" else "aarch64",
        sensors=sensors,
        gateway=gateway,
        site=f"site-{rng.randrange(20)}",
    )


def model_graphs(rng: random.Random) -> dict[str, list[ox.Triple]]:
    graphs = {}
    for index in range(MODELS):
        iri = f"urn:tinyfleet:model:m{index}"
        sensor = rng.choice(SENSORS[:6])
        turtle = f"""
        @prefix nnet: <https://w3id.org/tinyml-schema/neural-network-schema#> .
        @prefix tf: <https://w3id.org/tinyfleet#> . @prefix schema: <https://schema.org/> .
        @prefix sosa_extend: <https://w3id.org/tinyml-schema/neural-network-schema/sosa_extend/> .
        <{iri}> a nnet:NeuralNetwork ; schema:name "model {index}" ;
          tf:requiresRamKB {rng.choice([8, 16, 32, 64, 96, 128, 200])} ;
          tf:requiresFlashKB {rng.choice([20, 50, 100, 250, 500, 1000])} ;
          tf:requiresSensorType sosa_extend:{sensor} .
        """
        triples = [q.triple for q in ox.parse(turtle.encode(), format=ox.RdfFormat.TURTLE)]
        graphs[iri] = sparql_updates.skolemize(normalize_models(triples), iri)
    return graphs


def deployments(devices: int, rng: random.Random) -> dict[str, list[ox.Triple]]:
    tf = "https://w3id.org/tinyfleet#"
    triples = []
    for index in rng.sample(range(devices), devices * 3 // 10):
        node = ox.NamedNode(f"urn:tinyfleet:deployment:{index}")
        triples += [
            ox.Triple(node, ox.NamedNode(tf + "deployedOn"), ox.NamedNode(f"urn:tinyfleet:device:n{index}")),
            ox.Triple(
                node,
                ox.NamedNode(tf + "deployedArtifact"),
                ox.NamedNode(f"urn:tinyfleet:model:m{index % MODELS}"),
            ),
        ]
    return {"urn:tinyfleet:graph:deployments": triples}


def median_ms(run: Callable[[int], T], repeats: int, budget_s: float = 10.0) -> tuple[float, T]:
    """Median ms of `repeats` runs (fewer, at least one, once they have taken `budget_s`), and
    what the first run returned."""
    times: list[float] = []
    first: list[T] = []
    for attempt in range(repeats):
        start = time.perf_counter()
        value = run(attempt)
        times.append((time.perf_counter() - start) * 1000)
        if not first:
            first.append(value)
        if sum(times) > budget_s * 1000:
            break
    return statistics.median(times), first[0]


#: A query's equivalent forms; each engine is timed on each and its fastest counts.
Forms = dict[str, Callable[[int], str]]
#: A query result read to the end inside the timed run: (variables, rows as each engine gives them).
Read = tuple[list[str], list[Any]]
#: A result made comparable across forms and engines: sorted rows of {variable: lexical value}.
Answers = list[tuple[tuple[str, str], ...]]


#: Forms rdflib evaluates with nested loops over both sides (quadratic: minutes at 10k devices).
#: rdflib is timed on them at RDFLIB_QUADRATIC_MAX devices and below, where the JSON shows they are
#: its slowest forms, and not above: its faster forms of the same queries still run there.
RDFLIB_QUADRATIC = {
    ("anti-join: devices without a deployment", "MINUS"),
    ("eligible-devices (named query, every round): job criteria", "named query"),
    ("selective filter: mcu, >=256 kB RAM, accel+gyro", "every criterion a subquery"),
}
RDFLIB_QUADRATIC_MAX = 1000


def _same_text(text: str, _run: int) -> str:
    return text


def queries(devices: int, rng: random.Random) -> dict[str, Forms]:
    picks = [rng.randrange(devices) for _ in range(64)]
    gateways = " ".join(f"urn:tinyfleet:device:gw-{g}" for g in range(0, max(1, devices // 200), 2))
    job = {
        "min_ram_kb": "256",
        "sensors": "sosa_extend:Gyroscope sosa_extend:Accelerometer",
        "device_class": "mcu",
        "gateway": gateways,  # half the gateways; every criterion set (rdflib fails on empty VALUES)
    }
    return {
        "point: compatible-models of one device": {
            "named query": lambda i: render(
                "compatible-models", {"device": f"urn:tinyfleet:device:n{picks[i % len(picks)]}"}
            )
        },
        "selective filter: mcu, >=256 kB RAM, accel+gyro": {
            "patterns in order": lambda i: SELECTIVE,
            "subquery hash join": lambda i: SELECTIVE_HASH_JOIN,
            "hash join, class and RAM in one FILTER": lambda i: SELECTIVE_FILTERED,
            "every criterion a subquery": lambda i: SELECTIVE_SUBQUERIES,
        },
        "eligible-devices (named query, every round): job criteria": {
            "named query": lambda i: render("eligible-devices", job),
            "plain EXISTS form": lambda i: ELIGIBLE_PLAIN.render(job),
        },
        "GROUP BY: devices and online per gateway": {"named query": lambda i: render("per-gateway-counts")},
        "anti-join: devices without a deployment": {
            form: functools.partial(_same_text, text) for form, text in ANTI_JOINS.items()
        },
    }


def oxigraph_read(store: Any, text: str) -> Read:
    result = store.query(text)
    if isinstance(result, ox.QueryBoolean):
        return ["boolean"], [bool(result)]
    return [v.value for v in result.variables], list(result)


def oxigraph_answers(read: Read) -> Answers:
    names, rows = read
    if names == ["boolean"]:
        return [(("boolean", str(rows[0]).lower()),)]
    return sorted(tuple(sorted((n, "" if row[n] is None else row[n].value) for n in names)) for row in rows)


def rdflib_read(dataset: Any, text: str) -> Read:
    result = dataset.query(text)
    return [str(v) for v in result.vars], [row for row in result]  # list() trips on rdflib's __len__


def rdflib_answers(read: Read) -> Answers:
    names, rows = read
    return sorted(
        tuple(sorted((n, "" if term is None else str(term)) for n, term in zip(names, row, strict=True)))
        for row in rows
    )


def _read_form(read: Callable[[str], Read], form: Callable[[int], str], run: int) -> Read:
    return read(form(run))


def time_engine(
    texts: dict[str, Forms],
    read: Callable[[str], Read],
    answers: Callable[[Read], Answers],
    repeats: int,
    engine: str,
    skip: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset(),
) -> dict[str, Any]:
    """Median ms per query and form on one engine, its fastest form per query, and the answers
    (each result is read to the end inside the timed run; made comparable after the clock stops).
    Equivalent forms must give the same answers. A form the engine cannot evaluate is recorded
    with the engine's error; (query, form) pairs in `skip` are not run."""
    by_form: dict[str, dict[str, float]] = {}
    failed: dict[str, dict[str, str]] = {}
    found: dict[str, Answers] = {}
    for name, forms in texts.items():
        by_form[name] = {}
        for form, text in forms.items():
            if (name, form) in skip:
                failed.setdefault(name, {})[form] = "not run: quadratic in this engine at this size"
                continue
            try:
                ms, first = median_ms(functools.partial(_read_form, read, text), repeats)
            except Exception as exc:  # the engine's own failure, kept in the results
                failed.setdefault(name, {})[form] = f"{type(exc).__name__}: {exc}"
                continue
            by_form[name][form] = ms
            got = answers(first)
            if name in found and got != found[name]:
                raise AssertionError(
                    f"{engine}: {form!r} does not give the answers of the other forms of {name!r}"
                )
            found[name] = got
        if not by_form[name]:
            raise RuntimeError(f"{engine} evaluates no form of {name!r}: {failed[name]}")
    fastest = {name: min((ms, form) for form, ms in times.items()) for name, times in by_form.items()}
    return {
        "queries_ms": {name: ms for name, (ms, _) in fastest.items()},
        "query_form": {name: form for name, (_, form) in fastest.items()},
        "queries_ms_by_form": by_form,
        "forms_failed": failed,
        "rows": {name: len(rows) for name, rows in found.items()},
        "answers": found,
    }


def run_size(
    devices: int,
    *,
    register: int,
    rdflib_max: int,
    repeats: int,
    seed: int,
    clients: Sequence[int] = (),
    grpc_registrations: int = 0,
    db_url: str | None = None,
) -> dict[str, Any]:
    from rich.progress import Progress

    rng = random.Random(seed)
    gateways = max(1, devices // 200)
    tds = [device_td(i, rng, gateways) for i in range(devices)]
    bodies = [json.dumps(td).encode() for td in tds]
    register = min(register, devices)
    result: dict[str, Any] = {"devices": devices, "registered_through_real_path": register}
    with tempfile.TemporaryDirectory(prefix="tinyfleet-bench-") as tmp:
        # Where `tinyfleet server start --data-dir ROOT/coordinator` keeps its registry: the
        # coordinator started for the gRPC registrations below opens this very store.
        (Path(tmp) / "coordinator").mkdir()
        registry = Registry(EmbeddedStore(Path(tmp) / "coordinator" / "registry"))
        bulk = devices - register
        with Progress(transient=True) as progress:
            task = progress.add_task(f"{devices} devices: bulk load", total=bulk)
            start = time.perf_counter()
            for begin in range(0, bulk, 5000):
                chunk = bodies[begin : min(bulk, begin + 5000)]
                prepared = [registry.prepare_unvalidated(b, TD_JSON, None, None) for b in chunk]
                registry.bulk_load(prepared)
                progress.update(task, advance=len(chunk))
            registry.bulk_load([], {**model_graphs(rng), **deployments(devices, rng)})
            result["bulk_load_s"] = time.perf_counter() - start
            # Real path, one registration (one SHACL run, one update) at a time: first half.
            half = register // 2
            task = progress.add_task(f"{devices} devices: registrations", total=register)
            start = time.perf_counter()
            for body in bodies[bulk : bulk + half]:
                registry.put(registry.prepare(body, TD_JSON))
                progress.update(task, advance=1)
            result["register_one_by_one_per_s"] = half / (time.perf_counter() - start) if half else 0.0
            # Real path in batches of 200 (one SHACL run and one update per batch): second half.
            start = time.perf_counter()
            rest = bodies[bulk + half : bulk + register]
            for begin in range(0, len(rest), 200):
                batch = [(b, TD_JSON, None, None) for b in rest[begin : begin + 200]]
                registry.put_many(registry.prepare_many(batch))  # type: ignore[arg-type]
                progress.update(task, advance=len(batch))
            result["register_batched_per_s"] = len(rest) / (time.perf_counter() - start) if rest else 0.0
        registry.store.oxigraph.optimize()  # type: ignore[attr-defined]
        online = {
            f"urn:tinyfleet:device:n{i}": (True, None) for i in rng.sample(range(devices), devices // 2)
        }
        registry.set_liveness(online)
        texts = queries(devices, rng)
        store = registry.store
        timed = time_engine(texts, lambda q: oxigraph_read(store, q), oxigraph_answers, repeats, "oxigraph")
        answers = timed.pop("answers")
        result.update(timed)
        result["query_forms_tried"] = {name: list(forms) for name, forms in texts.items()}
        target = bodies[rng.randrange(devices)]
        result["single_update_ms"] = median_ms(
            lambda i: registry.put(registry.prepare(target, TD_JSON)), repeats
        )[0]
        if devices <= rdflib_max:
            result["rdflib"] = rdflib_side(
                store.oxigraph.dump(format=ox.RdfFormat.N_QUADS),  # type: ignore[attr-defined]
                texts,
                max(3, repeats // 5),
                devices,
            )
            for name, theirs in result["rdflib"].pop("answers").items():
                if theirs != answers[name]:
                    raise AssertionError(f"rdflib and Oxigraph give different answers to {name!r}")
        registry.store.close()
        if clients and grpc_registrations:
            fresh = [
                json.dumps(device_td(devices + i, rng, gateways)).encode()
                for i in range(grpc_registrations * len(clients))
            ]
            result["register_grpc"] = grpc_side(Path(tmp), fresh, clients, db_url)
    return result


def grpc_side(root: Path, bodies: list[bytes], levels: Sequence[int], db_url: str | None) -> dict[str, Any]:
    """A real coordinator process (`tinyfleet server start` on 127.0.0.1, embedded store holding the
    fleet just measured), measured from outside:
    - registrations per second from C concurrent gRPC clients, each with its own channel
      registering new devices one after another as agents do (each with its own Ed25519 key,
      signed, presenting an enrollment token): signature check, SHACL validation, the group
      commit in SQL (device + outbox rows + the token's use, durable), and the projector writing
      the graphs. "acked" stops the clock at the last response; "projected" when the store has
      applied the last outbox row (read through /sparql), which is the figure for the whole path;
    - Connect handshakes per second from C concurrent clients (the coordinator's challenge, the
      device's signed Hello, the Welcome; the liveness writes of connect and disconnect included);
    - seconds from a runaway SPARQL query's deadline until the coordinator's CPU (its query
      workers included) stops growing, over a few queries."""
    from tinyfleet.simulations.local_fleet import LocalFleet

    share = len(bodies) // len(levels)
    out: dict[str, Any] = {"registrations_per_level": share, "db": db_url or "sqlite (WAL, synchronous=FULL)"}
    sparql_timeout_s = 2.0
    server_args = ["--sparql-timeout", f"{sparql_timeout_s:g}"]
    with LocalFleet(root, db_url=db_url, server_args=server_args) as fleet:
        fleet.start_server(timeout=300)
        token = fleet.enroll(uses=len(bodies), label="registry benchmark")
        sql = sa.create_engine(db_url or default_url(fleet.data_dir))
        devices: list[tuple[str, DeviceKey]] = []
        try:
            for number, clients in enumerate(levels):
                batch = bodies[number * share : (number + 1) * share]
                acked_s, projected_s, registered = asyncio.run(
                    _register_concurrently(fleet.address, fleet.http_address, sql, batch, clients, token)
                )
                devices += registered
                out[f"clients_{clients}"] = {
                    "acked_per_s": len(batch) / acked_s,
                    "projected_per_s": len(batch) / projected_s,
                }
        finally:
            sql.dispose()
        for clients in levels:
            elapsed = asyncio.run(_connect_concurrently(fleet.address, devices[:share], clients))
            out[f"connect_clients_{clients}"] = {"handshakes_per_s": share / elapsed}
        assert fleet.server is not None
        stops = [
            deadline_to_cpu_stop(fleet.server.pid, _runaway_sender(fleet.http_address), sparql_timeout_s)
            for _ in range(RUNAWAY_REPEATS)
        ]
        out["query_deadline_to_cpu_stop_s"] = {
            "median": statistics.median(stops), "max": max(stops), "runs": stops,
            "timeout_s": sparql_timeout_s,
        }
    return out


def _runaway_sender(http: str) -> Callable[[], object]:
    import httpx

    def send() -> object:
        answer = httpx.get(f"http://{http}/sparql", params={"query": RUNAWAY}, timeout=60)
        if answer.status_code != 503:
            raise AssertionError(f"the runaway query was answered {answer.status_code}, not 503")
        return answer

    return send


async def _register_concurrently(
    address: str, http: str, sql: sa.Engine, bodies: list[bytes], clients: int, enroll_token: str
) -> tuple[float, float, list[tuple[str, DeviceKey]]]:
    import grpc
    import httpx

    from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc

    keys = [DeviceKey.generate() for _ in bodies]  # made and signed on the devices: off the clock
    requests = [
        fleet_pb2.RegisterRequest(
            description=body, media_type=TD_JSON, public_key=key.public_key, sequence=1,
            signature=key.sign_register(body, TD_JSON, 1, enroll_token), enrollment_token=enroll_token,
        )
        for body, key in zip(bodies, keys, strict=True)
    ]
    registered: list[tuple[str, DeviceKey]] = []

    async def client(mine: list[tuple[fleet_pb2.RegisterRequest, DeviceKey]]) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            for request, key in mine:
                response = await stub.Register(request, timeout=120)
                if not response.created:
                    raise AssertionError(f"{response.device_id} was not created")
                registered.append((response.device_id, key))

    pairs = list(zip(requests, keys, strict=True))
    start = time.perf_counter()
    await asyncio.gather(*(client(pairs[k::clients]) for k in range(clients)))
    acked = time.perf_counter() - start
    with sql.connect() as conn:
        target = int(conn.execute(sa.text("SELECT max(seq) FROM outbox")).scalar() or 0)
    seq_query = (
        f"SELECT ?seq WHERE {{ GRAPH <{sparql_updates.META_GRAPH}> {{ <{sparql_updates.REGISTRY_IRI}> "
        f"<https://w3id.org/tinyfleet#lastAppliedSeq> ?seq }} }}"
    )
    async with httpx.AsyncClient(base_url=f"http://{http}", timeout=30) as web:
        while True:
            answer = await web.get(
                "/sparql", params={"query": seq_query}, headers={"accept": "application/sparql-results+json"}
            )
            answer.raise_for_status()
            rows = answer.json()["results"]["bindings"]
            if rows and int(rows[0]["seq"]["value"]) >= target:
                return acked, time.perf_counter() - start, registered
            # not every 10 ms: a query after a write makes a query worker reopen the store
            await asyncio.sleep(0.05)


async def _connect_concurrently(address: str, devices: list[tuple[str, DeviceKey]], clients: int) -> float:
    """Seconds for `clients` concurrent clients to complete one Connect handshake per device
    (challenge, signed Hello, Welcome), each client one stream after another."""
    import grpc

    from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc

    async def client(mine: list[tuple[str, DeviceKey]]) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            for device_id, key in mine:
                call = stub.Connect()
                challenge = await call.read()
                if challenge.WhichOneof("kind") != "challenge":
                    raise AssertionError(f"{device_id}: the first frame was not a challenge")
                nonce = challenge.challenge.nonce
                await call.write(fleet_pb2.AgentFrame(hello=fleet_pb2.Hello(
                    device_id=device_id, signature=key.sign_connect(nonce, device_id)
                )))
                welcome = await call.read()
                if welcome is grpc.aio.EOF or welcome.WhichOneof("kind") != "welcome":
                    raise AssertionError(f"{device_id}: no Welcome ({await call.code()})")
                call.cancel()

    start = time.perf_counter()
    await asyncio.gather(*(client(devices[k::clients]) for k in range(clients)))
    return time.perf_counter() - start


def rdflib_side(nquads: bytes, texts: dict[str, Forms], repeats: int, devices: int) -> dict[str, Any]:
    import rdflib

    start = time.perf_counter()
    dataset = rdflib.Dataset(default_union=True)
    dataset.parse(data=nquads, format="nquads")
    load_s = time.perf_counter() - start
    return {
        "load_s": load_s,
        **time_engine(
            texts,
            lambda q: rdflib_read(dataset, q),
            rdflib_answers,
            repeats,
            "rdflib",
            RDFLIB_QUADRATIC if devices > RDFLIB_QUADRATIC_MAX else frozenset(),
        ),
    }


def print_table(results: list[dict[str, Any]], rdflib_max: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tinyfleet registry (Oxigraph on disk) vs rdflib in-memory, median ms")
    for column in ("devices", "measure", "oxigraph", "rdflib", "speed-up"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    for r in results:
        n = f"{r['devices']:,}"
        table.add_row(n, "bulk load (s)", f"{r['bulk_load_s']:.1f}", "", "")
        table.add_row(
            n,
            f"register one by one ({r['registered_through_real_path'] // 2}), per s",
            f"{r['register_one_by_one_per_s']:.0f}",
            "",
            "",
        )
        table.add_row(n, "register in batches of 200, per s", f"{r['register_batched_per_s']:.0f}", "", "")
        grpc_runs = r.get("register_grpc", {})
        for key, run in grpc_runs.items():
            if key.startswith("clients_"):
                clients = int(key.removeprefix("clients_"))
                who = "1 gRPC client, one by one" if clients == 1 else f"{clients} concurrent gRPC clients"
                table.add_row(
                    n,
                    f"register through coordinator (key + token + SHACL + SQL group commit + projector), "
                    f"{who}, per s",
                    f"{run['projected_per_s']:.0f}",
                    "",
                    f"acked {run['acked_per_s']:.0f}/s",
                )
            elif key.startswith("connect_clients_"):
                clients = int(key.removeprefix("connect_clients_"))
                table.add_row(
                    n, f"Connect handshakes (challenge, signed Hello, Welcome), {clients} clients, per s",
                    f"{run['handshakes_per_s']:.0f}", "", "",
                )
        if (stop := grpc_runs.get("query_deadline_to_cpu_stop_s")) is not None:
            table.add_row(
                n, f"runaway SPARQL query: deadline ({stop['timeout_s']:g} s) to CPU stopped, s (median)",
                f"{stop['median']:.2f}", "", f"max {stop['max']:.2f}",
            )
        for name, ms in r["queries_ms"].items():
            other = r.get("rdflib", {}).get("queries_ms", {}).get(name)
            rd = f"{other:.1f}" if other is not None else f"not run (> {rdflib_max:,} devices)"
            ratio = f"{other / ms:.0f}x" if other is not None and ms > 0 else ""
            label = f"{name} ({r['rows'][name]} rows)"
            forms = r["query_forms_tried"][name]
            if len(forms) > 1:
                label += f"; fastest form, oxigraph: {r['query_form'][name]}"
                if "rdflib" in r:
                    label += f", rdflib: {r['rdflib']['query_form'][name]}"
            table.add_row(n, label, f"{ms:.2f}", rd, ratio)
            for form in forms if len(forms) > 1 else ():
                mine = r["queries_ms_by_form"][name][form]
                theirs = r.get("rdflib", {}).get("queries_ms_by_form", {}).get(name, {}).get(form)
                why = r.get("rdflib", {}).get("forms_failed", {}).get(name, {}).get(form, "")
                table.add_row(
                    n,
                    f"    form: {form}",
                    f"{mine:.2f}",
                    f"{theirs:.1f}"
                    if theirs is not None
                    else ("not run" if why.startswith("not run") else why[:12]),
                    f"{theirs / mine:.0f}x" if theirs is not None and mine > 0 else "",
                )
        table.add_row(n, "single-device update (re-registration)", f"{r['single_update_ms']:.2f}", "", "")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", default="1000,10000,100000", help="comma-separated fleet sizes")
    parser.add_argument(
        "--register", type=int, default=2000, help="devices registered through the real path per size"
    )
    parser.add_argument("--rdflib-max", type=int, default=10_000, help="largest fleet rdflib is run on")
    parser.add_argument("--repeats", type=int, default=20, help="runs per query (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clients", default="1,8,32,64", help="concurrent gRPC clients registering via a real coordinator"
    )
    parser.add_argument(
        "--grpc-registrations", type=int, default=800, help="new devices registered over gRPC per level"
    )
    parser.add_argument("--db", default=None, help="the coordinator's SQL URL (default: SQLite in its dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    watch = RunWatch()
    sizes = [int(s) for s in args.devices.split(",") if s.strip()]
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    results = [
        run_size(
            n,
            register=args.register,
            rdflib_max=args.rdflib_max,
            repeats=args.repeats,
            seed=args.seed,
            clients=levels,
            grpc_registrations=args.grpc_registrations,
            db_url=args.db,
        )
        for n in sizes
    ]
    print_table(results, args.rdflib_max)
    if args.json:
        figures = {"rdflib_max_devices": args.rdflib_max, "sizes": results}
        write_results(args.json, watch.record(module_command(__spec__.name, argv), figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
