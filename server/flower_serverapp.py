"""A tinyfleet job as a stock Flower ServerApp, for users who already run a Flower deployment.

The job's strategy runs with Flower's own round loop (`Strategy.start`) on the
grid Flower hands the ServerApp (SuperLink + SuperNodes); strategy, configs and
initial model come from the same helpers the coordinator's job runner uses
(server/job_strategy.py), so a job file means the same thing on every grid.

What the coordinator adds on FleetGrid and `Strategy.start` does not (quorum per
round, checkpoints, resume) is not available here; the one fleet setting kept
is the bounded wait for `round.min_nodes` before the first round, so a job does
not hang on an empty federation.

With `result-dir` in the run config the ServerApp writes what the job produced
there: the final model (`model.arrayrecord`, Flower's ArrayRecord protobuf, the
coordinator's artifact encoding) and `result.json` (per-round metrics, nodes,
model sha256), each replaced atomically; `result.json` is written last.
"""

from __future__ import annotations

import hashlib
import json
import time
from logging import INFO
from pathlib import Path
from typing import Any, Final

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from tinyfleet.common.atomic_files import write_atomically
from tinyfleet.common.flower_adapter import array_record_to_bytes
from tinyfleet.common.jobspec import JobSpec, JobSpecError, load_job_spec
from tinyfleet.server.job_strategy import build_strategy, evaluate_config, initial_arrays, train_config

#: Run-config keys the ServerApp reads (`flwr run ... --run-config "result-dir='/tmp/out'"`).
RESULT_DIR_KEY: Final = "result-dir"
JOB_KEY: Final = "job"
RESULT_FILE: Final = "result.json"
MODEL_FILE: Final = "model.arrayrecord"
#: Seconds between looks at the federation while waiting for enough SuperNodes.
NODE_POLL_S: Final = 1.0


class FederationTooSmallError(RuntimeError):
    """Fewer SuperNodes than the job's `round.min_nodes` connected within `round.wait_for_nodes_s`."""


def make_server_app(spec: JobSpec) -> ServerApp:
    """A ServerApp that runs `spec` on the Flower deployment it is started in."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_job(grid, spec, result_dir_from(context.run_config), run_id=context.run_id)

    return app


def job_from_run_config(run_config: dict[str, Any], base_dir: Path) -> JobSpec:
    """The job file named by run-config `job`; a relative path is taken from `base_dir` (the app's folder)."""
    value = run_config.get(JOB_KEY)
    if not isinstance(value, str) or not value.strip():
        raise JobSpecError("<run-config job>", "expected the path of a tinyfleet job file")
    path = Path(value).expanduser()
    return load_job_spec(path if path.is_absolute() else base_dir / path)


def result_dir_from(run_config: dict[str, Any]) -> Path | None:
    value = run_config.get(RESULT_DIR_KEY, "")
    if not isinstance(value, str):
        raise ValueError(f"run config {RESULT_DIR_KEY!r} must be a path string, got {value!r}")
    return Path(value).expanduser() if value.strip() else None


def run_job(grid: Grid, spec: JobSpec, result_dir: Path | None = None, *, run_id: int = 0) -> Result:
    """Build the job's strategy, run it for `spec.rounds` rounds on `grid`, save the result."""
    strategy = build_strategy(spec)
    started = time.monotonic()
    nodes = wait_for_nodes(grid, spec.round.min_nodes, spec.round.wait_for_nodes_s)
    log(INFO, "tinyfleet job %r: %s on %d Flower SuperNode(s)", spec.name, spec.strategy, len(nodes))
    result = strategy.start(
        grid,
        initial_arrays(spec),
        num_rounds=spec.rounds,
        timeout=spec.round.deadline_s,
        train_config=train_config(spec),
        evaluate_config=evaluate_config(spec),
    )
    elapsed = time.monotonic() - started
    if result_dir is not None:
        path = save_result(result_dir, spec, result, nodes=nodes, run_id=run_id, duration_s=elapsed)
        log(INFO, "tinyfleet job %r: result written to %s", spec.name, path)
    return result


def wait_for_nodes(grid: Grid, min_nodes: int, wait_s: float) -> list[int]:
    """The connected node ids once at least `min_nodes` are there; bounded by `wait_s`."""
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() >= deadline:
            raise FederationTooSmallError(
                f"{len(nodes)} SuperNode(s) connected after {wait_s:g} s; the job needs "
                f"round.min_nodes = {min_nodes}"
            )
        time.sleep(NODE_POLL_S)
    return nodes


def save_result(
    result_dir: Path, spec: JobSpec, result: Result, *, nodes: list[int], run_id: int, duration_s: float
) -> Path:
    """Write model then summary, each atomically; returns the summary's path."""
    result_dir.mkdir(parents=True, exist_ok=True)
    blob = array_record_to_bytes(result.arrays)
    write_atomically(result_dir / MODEL_FILE, blob)
    summary = {
        "job": spec.to_dict(),
        "run_id": run_id,
        "nodes": nodes,
        "rounds": spec.rounds,
        "duration_s": duration_s,
        "train_metrics": _per_round(result.train_metrics_clientapp),
        "evaluate_metrics": _per_round(result.evaluate_metrics_clientapp),
        "model": {
            "file": MODEL_FILE,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "arrays": _shapes(result.arrays),
        },
    }
    path = result_dir / RESULT_FILE
    write_atomically(path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return path


def _per_round(metrics: dict[int, MetricRecord]) -> dict[str, dict[str, Any]]:
    return {str(r): dict(record.items()) for r, record in sorted(metrics.items())}


def _shapes(arrays: ArrayRecord) -> dict[str, list[int]]:
    return {name: list(array.shape) for name, array in arrays.items()}


