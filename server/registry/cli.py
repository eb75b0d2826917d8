"""`tinyfleet query ...` and `tinyfleet registry import|export|rebuild|validate|queries`.

Every command that reads or writes the registry takes the same choice of where
it is: `--data-dir DIR` (the embedded store of a stopped server), `--server URL`
(a running server's HTTP address; writes need --admin-token), or `--registry
URL` (a SPARQL 1.1 dataset server such as `oxigraph serve`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tinyfleet.cli import HelpFormatter

QUERY_EPILOG = """examples:
  tinyfleet query --data-dir ./fleet 'SELECT ?d WHERE { ?d a tf:Device }'
  tinyfleet query --server http://127.0.0.1:7080 --named compatible-models \\
      --param device=urn:tinyfleet:device:pi-01
  tinyfleet query --data-dir ./fleet --named eligible-devices --param min_ram_kb=256 \\
      --param sensors=sosa_extend:Accelerometer --format csv

The prefixes tf:, td:, sosa:, ssn:, s3n:, nnet:, sosa_extend:, prov:, schema:, om: ... are predeclared.
`tinyfleet registry queries` lists the named queries and their parameters.
"""

REGISTRY_EPILOG = """examples:
  tinyfleet registry import ../shared/data/seloc_ml/*.ttl --data-dir ./fleet
  tinyfleet registry validate device.td.json
  tinyfleet registry export --data-dir ./fleet -o fleet.nq
  tinyfleet registry rebuild --data-dir ./fleet
"""


def _where(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--data-dir", type=Path, help="data directory of a (stopped) server: DIR/registry")
    group.add_argument("--server", help="HTTP address of a running server, e.g. http://127.0.0.1:7080")
    group.add_argument("--registry", help="SPARQL 1.1 dataset server (BASE/query, BASE/update)")
    parser.add_argument(
        "--admin-token",
        default=None,
        help="admin token for writes through --server (default: --admin-token-file, then "
        "$TINYFLEET_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--admin-token-file", type=Path, default=None,
        help="read the admin token from this file (the coordinator writes DATA_DIR/admin-token)",
    )


def _admin_token(args: argparse.Namespace) -> str:
    """The admin token the operator gave (outright, in a file, or in the environment), or ''.
    ValueError names a token file that cannot be read."""
    from tinyfleet.server.admin_client import admin_token_from

    try:
        return admin_token_from(args.admin_token, args.admin_token_file)
    except OSError as exc:
        raise ValueError(str(exc)) from exc


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    query = subparsers.add_parser(
        "query",
        help="run SPARQL (or a named query) against the fleet registry",
        formatter_class=HelpFormatter,
        epilog=QUERY_EPILOG,
    )
    query.add_argument("sparql", nargs="?", help="SPARQL query text ('-' reads it from stdin)")
    query.add_argument("--named", help="a named query instead of SPARQL text")
    query.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="named query parameter"
    )
    query.add_argument("--format", choices=["table", "json", "csv"], default="table")
    _where(query)
    query.set_defaults(func=_query)

    registry = subparsers.add_parser(
        "registry",
        help="import, export, rebuild and validate fleet descriptions",
        formatter_class=HelpFormatter,
        epilog=REGISTRY_EPILOG,
    )
    registry.set_defaults(group_parser=registry)
    sub = registry.add_subparsers(dest="registry_command", metavar="COMMAND")

    imp = sub.add_parser(
        "import",
        help="import published TinyML/S3N Turtle (repairs known quirks, prints a report)",
        formatter_class=HelpFormatter,
        epilog="examples:\n  tinyfleet registry import ../shared/data/seloc_ml/*.ttl --data-dir ./fleet\n"
        "  tinyfleet registry import boards.ttl --server http://127.0.0.1:7080 --admin-token TOKEN\n\n"
        "With --data-dir or --server the file is kept in the coordinator's SQL database\n"
        "and projected, so `registry rebuild` keeps it; importing the same file name\n"
        "again replaces it.\n",
    )
    imp.add_argument("files", nargs="+", type=Path)
    imp.add_argument(
        "--base", help="base IRI for relative IRIs (default: the file's '# baseURI:' or its path)"
    )
    imp.add_argument("--db", help="with --data-dir: SQLAlchemy URL (default: SQLite in the data dir)")
    _where(imp)
    imp.set_defaults(func=_import)

    export = sub.add_parser(
        "export",
        help="write every graph of the registry as N-Quads or TriG",
        formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet registry export --data-dir ./fleet -o fleet.trig --format trig\n",
    )
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    export.add_argument("--format", choices=["nquads", "trig"], default="nquads")
    _where(export)
    export.set_defaults(func=_export)

    rebuild = sub.add_parser(
        "rebuild",
        help="regenerate the registry from the coordinator's SQL database (server stopped)",
        formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet registry rebuild --data-dir ./fleet\n"
        "  tinyfleet registry rebuild --data-dir ./fleet --db postgresql+psycopg://postgres@127.0.0.1/test\n",
    )
    rebuild.add_argument("--data-dir", type=Path, required=True, help="the server's data directory")
    rebuild.add_argument("--db", help="SQLAlchemy URL (default: SQLite in the data dir)")
    rebuild.add_argument("--registry", help="rebuild this SPARQL dataset server instead of DIR/registry")
    rebuild.set_defaults(func=_rebuild)

    validate = sub.add_parser(
        "validate",
        help="check a device description (TD JSON-LD or Turtle) against the fleet shapes",
        formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet registry validate pi.td.json\n",
    )
    validate.add_argument("file", type=Path)
    validate.set_defaults(func=_validate)

    queries = sub.add_parser(
        "queries",
        help="list the named queries and their parameters",
        formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet registry queries\n",
    )
    queries.set_defaults(func=_list_queries)


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _open_store(args: argparse.Namespace) -> Any:
    from tinyfleet.server.registry.store import EmbeddedStore, RemoteStore

    if getattr(args, "server", None):
        return RemoteStore.endpoint(args.server.rstrip("/") + "/sparql", token=_admin_token(args) or None)
    if getattr(args, "registry", None):
        return RemoteStore(args.registry)
    if getattr(args, "data_dir", None):
        path = Path(args.data_dir) / "registry"
        if not path.exists():
            raise FileNotFoundError(f"no registry at {path} (import something or start the server first)")
        return EmbeddedStore(path)
    raise ValueError("say where the registry is: --data-dir DIR, --server URL or --registry URL")


def _open_registry(args: argparse.Namespace, *, create: bool = False) -> Any:
    from tinyfleet.server.registry.store import EmbeddedStore
    from tinyfleet.server.registry.thing_graphs import Registry

    if create and getattr(args, "data_dir", None) and not (Path(args.data_dir) / "registry").exists():
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        return Registry(EmbeddedStore(Path(args.data_dir) / "registry"))
    return Registry(_open_store(args))


def _query(args: argparse.Namespace) -> int:
    import pyoxigraph as ox

    from tinyfleet.ontology import sparql_prologue
    from tinyfleet.ontology.catalog import QueryError, parse_assignments, render
    from tinyfleet.server.registry.store import StoreError

    try:
        if args.named:
            if args.sparql:
                return _fail("give SPARQL text or --named NAME, not both")
            text = render(args.named, parse_assignments(args.param))
        elif args.sparql:
            text = sys.stdin.read() if args.sparql == "-" else args.sparql
            text = sparql_prologue() + text
        else:
            return _fail("give SPARQL text or --named NAME (see --help)")
        store = _open_store(args)
        result = store.query(text)
    except QueryError as exc:
        return _fail(str(exc))
    except SyntaxError as exc:
        return _fail(f"SPARQL syntax error: {exc}")
    except (StoreError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    if isinstance(result, ox.QueryBoolean):
        print("true" if bool(result) else "false")
        return 0
    if not isinstance(result, ox.QuerySolutions):
        turtle = io.BytesIO()
        ox.serialize(list(result), turtle, format=ox.RdfFormat.TURTLE)
        sys.stdout.write(turtle.getvalue().decode())
        return 0
    names = [v.value for v in result.variables]
    rows = [[row[name].value if row[name] is not None else "" for name in names] for row in result]
    if args.format == "json":
        print(json.dumps([dict(zip(names, row, strict=True)) for row in rows], indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(names)
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*names, caption=f"{len(rows)} row(s)")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    return 0


def _print_report(path: Path, report: Any) -> None:
    print(
        f"imported {path}: {len(report.devices)} device(s), {len(report.models)} model(s), "
        f"{report.triples} triples (base {report.base})",
        file=sys.stderr,
    )
    for repair in report.repairs:
        print(f"  repaired {repair.kind} x{repair.count}: {repair.detail}", file=sys.stderr)
    if report.skolemized:
        print(f"  skolemized {report.skolemized} blank node(s): stored as IRIs, which DESCRIBE follows",
              file=sys.stderr)


def _import(args: argparse.Namespace) -> int:
    """Into SQL and then the store (--data-dir, --server), so a rebuild keeps what was imported;
    straight into a bare SPARQL server (--registry), which has no SQL behind it."""
    from tinyfleet.server.registry.importer import ImportFailed, import_document, import_file, read_document
    from tinyfleet.server.registry.store import StoreError

    if args.server:
        return _import_through_server(args)
    try:
        registry = _open_registry(args, create=True)
    except (StoreError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    if args.data_dir:
        from tinyfleet.server.database import default_url, open_database
        from tinyfleet.server.registry.projector import Projector
        from tinyfleet.server.repository import Repository

        repo = Repository(open_database(args.db or default_url(args.data_dir)))
        projector = Projector(registry, repo)
    else:
        print("note: --registry has no SQL behind it; a rebuild will not keep this import", file=sys.stderr)
    failed = 0
    for path in args.files:
        try:
            if args.data_dir:
                report = import_document(registry, repo, projector, read_document(path, args.base))
            else:
                report = import_file(registry, path, base=args.base)
        except ImportFailed as exc:
            failed += 1
            print(f"not imported {path}:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem.path}: {problem.message}", file=sys.stderr)
            continue
        except StoreError as exc:
            return _fail(str(exc))
        _print_report(path, report)
    return 1 if failed else 0


def _import_through_server(args: argparse.Namespace) -> int:
    import httpx

    from tinyfleet.server.http.imports import report_from_json
    from tinyfleet.server.registry.importer import ImportFailed, read_document

    headers = {"content-type": "text/turtle"}
    try:
        token = _admin_token(args)
    except ValueError as exc:
        return _fail(str(exc))
    if token:
        headers["authorization"] = f"Bearer {token}"
    url = args.server.rstrip("/") + "/registry/imports"
    failed = 0
    with httpx.Client(timeout=120.0, headers=headers) as client:
        for path in args.files:
            try:
                document = read_document(path, args.base)
                response = client.post(
                    url, params={"name": document.name, "base": document.base}, content=document.content
                )
            except ImportFailed as exc:
                failed += 1
                print(f"not imported {path}: {exc}", file=sys.stderr)
                continue
            except httpx.HTTPError as exc:
                return _fail(f"cannot reach the server at {args.server}: {exc}")
            if response.status_code != 200:
                failed += 1
                body = _json_or_empty(response)
                detail = body.get("detail") or response.text[:500]
                print(f"not imported {path}: {response.status_code} {detail}", file=sys.stderr)
                for problem in body.get("validationErrors", []):
                    print(f"  {problem['path']}: {problem['message']}", file=sys.stderr)
                if response.status_code in {401, 403, 404}:
                    return 2
                continue
            _print_report(path, report_from_json(response.json()))
    return 1 if failed else 0


def _json_or_empty(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _export(args: argparse.Namespace) -> int:
    import pyoxigraph as ox

    from tinyfleet.server.registry.store import EmbeddedStore, StoreError

    fmt = ox.RdfFormat.TRIG if args.format == "trig" else ox.RdfFormat.N_QUADS
    dump = io.BytesIO()
    try:
        store = _open_store(args)
        if isinstance(store, EmbeddedStore):
            store.oxigraph.dump(dump, format=fmt)
        else:
            rows = store.query("SELECT ?s ?p ?o ?g WHERE { GRAPH ?g { ?s ?p ?o } }")
            ox.serialize([ox.Quad(r["s"], r["p"], r["o"], r["g"]) for r in rows], dump, format=fmt)
    except (StoreError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    if args.output:
        args.output.write_bytes(dump.getvalue())
    else:
        sys.stdout.buffer.write(dump.getvalue())
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from tinyfleet.server.database import default_url, open_database
    from tinyfleet.server.registry.projector import rebuild
    from tinyfleet.server.registry.store import EmbeddedStore, RemoteStore, StoreError
    from tinyfleet.server.registry.thing_graphs import Registry
    from tinyfleet.server.repository import Repository

    if not args.db and not (Path(args.data_dir) / "coordinator.db").exists():
        return _fail(f"no coordinator database in {args.data_dir} (give --db URL for PostgreSQL)")
    repo = Repository(open_database(args.db or default_url(args.data_dir)))
    reports: list[Any] = []
    with Progress(transient=True) as progress:
        task = progress.add_task("rebuilding registry", total=None)

        def step(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if args.registry:
            store: RemoteStore | EmbeddedStore = RemoteStore(args.registry)
            try:
                store.update("DROP ALL")
                applied = rebuild(Registry(store), repo, progress=step, reports=reports)
            except StoreError as exc:
                return _fail(str(exc))
        else:
            target = Path(args.data_dir) / "registry"
            fresh = Path(args.data_dir) / "registry.rebuild"
            shutil.rmtree(fresh, ignore_errors=True)
            try:
                store = EmbeddedStore(fresh)
                applied = rebuild(Registry(store), repo, progress=step, reports=reports)
                store.close()
                if target.exists():
                    # Refuses (busy) while a server holds the old store, before anything is replaced.
                    EmbeddedStore(target).close()
                    old = target.with_name(f"registry.old-{int(time.time())}")
                    target.rename(old)
                    fresh.rename(target)
                    shutil.rmtree(old)
                else:
                    fresh.rename(target)
            except StoreError as exc:
                shutil.rmtree(fresh, ignore_errors=True)
                return _fail(str(exc))
    for report in reports:
        _print_report(Path(report.path), report)
    print(
        f"rebuilt: {applied.documents} imported document(s), {applied.descriptions} device "
        f"description(s), {applied.liveness} liveness record(s), {applied.skipped} skipped; "
        f"outbox sequence {applied.rows}"
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from tinyfleet.server.registry.store import EmbeddedStore
    from tinyfleet.server.registry.thing_graphs import Registry
    from tinyfleet.server.registry.validation import DescriptionInvalid

    try:
        data = args.file.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror}")
    suffix = args.file.suffix.lower()
    media_type = "text/turtle" if suffix in {".ttl", ".turtle"} else "application/td+json"
    try:
        prepared = Registry(EmbeddedStore(None)).prepare(data, media_type, for_training=True)
    except DescriptionInvalid as exc:
        print(f"{args.file}: invalid ({len(exc.errors)} problem(s))")
        for problem in exc.errors:
            print(f"  {problem.path or '(document)'}: {problem.message}")
        return 1
    print(f"{args.file}: valid description of {prepared.thing_id} ({len(prepared.triples)} triples)")
    return 0


def _list_queries(args: argparse.Namespace) -> int:
    del args
    from tinyfleet.ontology.catalog import catalog

    for name, query in catalog().items():
        print(f"{name}: {query.summary}")
        for param in query.params:
            default = "required" if param.required else f"default {param.default!r}"
            print(f"    {param.name} ({param.type}, {default}): {param.doc}")
    return 0
