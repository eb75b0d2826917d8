"""The job runner: one job at a time from a FIFO queue, each round under deadline and quorum.

It executes a Flower strategy's round loop itself instead of `Strategy.start`,
because a fleet needs what `start` does not do: wait (event-driven, bounded) for
enough nodes, drop and record late or dead nodes, end the job when quorum fails,
checkpoint every finished round, and resume after a crash from the last
finished round. A round never waits forever: node waits are bounded by
`wait_for_nodes_s`, the whole train phase (configure, send, replies) by
`deadline_s` and the evaluate phase by `evaluate_deadline_s`, so once its quorum
is online a round lasts at most the sum of the two plus aggregation. With
`max_update_ratio` set, FleetGrid drops train replies whose update is too large
for the global model (`tinyfleet.server.update_guard`) and records why.

A round that aggregates no model (every reply an error, or every reply weighing 0
examples: Flower's weighted means would divide by zero) keeps the model and goes on;
its row says why (`train_error`). An evaluation that yields no metrics (the phase
raised, every reply an error or weighing 0) does not fail the job either; its row
says why (`eval_error`), and `job status` shows both.

Durability: the aggregated model is written to the artifact store (atomic file)
before the round's SQL rows; the round row, node results, artifact row, job
progress and strategy state are one transaction. A crash at any point leaves the
job at its last finished round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from tinyfleet.common.flower_adapter import (
    array_record_from_bytes,
    array_record_to_bytes,
    empty_run,
    seed_node_sampling,
)
from tinyfleet.common.grids import REPLIED, Delivery
from tinyfleet.common.jobspec import JobSpec, parse_job_spec
from tinyfleet.server.artifacts import ArtifactStore
from tinyfleet.server.fleet_grid import FleetGrid, GridClosedError, NodeWaitTimeoutError
from tinyfleet.server.job_strategy import (
    build_strategy,
    evaluate_config,
    initial_arrays,
    train_config,
)
from tinyfleet.server.repository import (
    FAILED,
    FINISHED,
    QUEUED,
    ArtifactRecord,
    Job,
    NodeResult,
    Repository,
    RoundRecord,
)
from tinyfleet.server.strategy_state import restore_state, save_state
from tinyfleet.server.update_guard import guard_for

log = logging.getLogger(__name__)

#: How artifact blobs of global models are encoded (Flower's ArrayRecord protobuf).
ARRAY_RECORD_ENCODING = "flwr-arrayrecord"

#: Seconds between attempts to read the job queue while the database is unreachable.
DB_RETRY_S = 5.0

#: Turns a job's eligibility query into a node filter (the registry plugs in here).
Eligibility = Callable[[JobSpec], Callable[[], set[int]] | None]


class JobFailedError(Exception):
    """The job cannot go on; the message is the reason users see."""


class _Stopping(Exception):
    """The coordinator is stopping: leave the job running so a restart resumes it."""


def metrics_dict(record: MetricRecord | None) -> dict[str, Any] | None:
    return None if record is None else {k: v for k, v in record.items()}


class JobRunner:
    def __init__(
        self,
        repo: Repository,
        store: ArtifactStore,
        grid: FleetGrid,
        *,
        on_change: Callable[[int], None] = lambda job_id: None,
        eligibility: Eligibility | None = None,
    ) -> None:
        self.repo = repo
        self.store = store
        self.grid = grid
        self.on_change = on_change
        self.eligibility = eligibility
        self._wakeup = threading.Condition()
        self._work = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A job was submitted: look at the queue again."""
        with self._wakeup:
            self._work = True
            self._wakeup.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Abandon the round in progress (its job stays running for a restart) and join."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        self.grid.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                if self._stopping:
                    return
                self._work = False
            try:
                job = self.repo.next_job()
                if job is not None:
                    self.run_job(job)
                    continue
            except Exception:  # the database went away: keep the thread, retry on the next wake
                log.exception("job queue unavailable; retrying in %g s", DB_RETRY_S)
                with self._wakeup:
                    self._wakeup.wait_for(lambda: self._stopping, timeout=DB_RETRY_S)
                continue
            with self._wakeup:
                self._wakeup.wait_for(lambda: self._work or self._stopping)

    # -- one job -----------------------------------------------------------------
    def run_job(self, job: Job) -> None:
        try:
            self._run(job)
        except _Stopping:
            log.info("job %d left running at round %d: coordinator stopping", job.id,
                     (self.repo.get_job(job.id) or job).rounds_done)
            return
        except JobFailedError as exc:
            log.warning("job %d failed: %s", job.id, exc)
            self.repo.end_job(job.id, FAILED, str(exc))
        except Exception as exc:  # a strategy bug must fail its job, not the coordinator
            log.exception("job %d crashed", job.id)
            self.repo.end_job(job.id, FAILED, f"{type(exc).__name__}: {exc}")
        else:
            self.repo.end_job(job.id, FINISHED)
        self.on_change(job.id)

    def _run(self, job: Job) -> None:
        spec = parse_job_spec(job.spec_toml)
        strategy = build_strategy(spec)
        arrays, parent_sha = self._starting_point(job, spec, strategy)
        self.on_change(job.id)
        self.grid.set_run(empty_run(job.id))
        self.grid.eligible_nodes = self.eligibility(spec) if self.eligibility else None
        self.grid.update_guard = guard_for(spec.round.max_update_ratio, strategy)
        start = (self.repo.get_job(job.id) or job).rounds_done + 1
        for server_round in range(start, spec.rounds + 1):
            arrays, parent_sha = self._round(job.id, spec, strategy, server_round, arrays, parent_sha)
            self.on_change(job.id)

    def _starting_point(
        self, job: Job, spec: JobSpec, strategy: object
    ) -> tuple[ArrayRecord, str]:
        """Initial model for a new job, or the last finished round's model when resuming."""
        if job.state == QUEUED or job.rounds_done == 0:
            arrays = initial_arrays(spec)
            blob = array_record_to_bytes(arrays)
            sha = self.store.put(blob)
            if job.state == QUEUED:
                self.repo.start_job(job.id, ArtifactRecord(
                    sha, len(blob), ARRAY_RECORD_ENCODING, job.id, 0, None, time.time()
                ))
            return arrays, sha
        artifact = self.repo.round_artifact(job.id, job.rounds_done)
        if artifact is None:
            raise JobFailedError(f"cannot resume: no checkpoint for round {job.rounds_done}")
        arrays = array_record_from_bytes(self.store.get(artifact.sha256))
        restore_state(strategy, job.strategy_state, self.store)
        log.info("job %d resumes after round %d from artifact %s", job.id, job.rounds_done,
                 artifact.sha256[:12])
        return arrays, artifact.sha256

    def _round(
        self,
        job_id: int,
        spec: JobSpec,
        strategy: Any,
        server_round: int,
        arrays: ArrayRecord,
        parent_sha: str,
    ) -> tuple[ArrayRecord, str]:
        settings = spec.round
        online = self.grid.wait_for_nodes(settings.min_nodes, settings.wait_for_nodes_s)
        self._check_stopping()
        if online < settings.min_nodes:
            raise JobFailedError(
                f"quorum not reached: {online} of {settings.min_nodes} nodes online "
                f"(waited {settings.wait_for_nodes_s:g} s before round {server_round})"
            )
        started = time.time()  # the round's clock starts once its quorum is online
        self.grid.reference_arrays = arrays
        # Seeded per round so a job samples the same way on the same fleet (and again after a resume).
        seed_node_sampling(f"{spec.seed}:{server_round}")
        train_started = time.monotonic()
        try:
            replies = self._exchange(
                lambda: strategy.configure_train(server_round, arrays, train_config(spec), self.grid),
                settings.wait_for_nodes_s, settings.deadline_s,
            )
        except NodeWaitTimeoutError as exc:
            raise JobFailedError(f"quorum not reached in round {server_round}: {exc}") from exc
        train = self.grid.take_deliveries()
        replied = sum(d.status == REPLIED for d in train)
        if replied < settings.min_nodes:
            raise JobFailedError(
                f"quorum failed in round {server_round}: {replied} of {settings.min_nodes} "
                f"required nodes replied ({_drop_summary(train)})"
            )
        train_error = unweighable(strategy, replies)
        new_arrays, train_metrics = (None, None) if train_error else strategy.aggregate_train(
            server_round, replies
        )
        blob: bytes | None = None
        if new_arrays is None:
            # As Flower's own round loop does: a round with nothing to aggregate (every reply an
            # error, e.g. a restarted device refusing a delta against a copy it lost) keeps the
            # model; the job goes on and the round points at the unchanged artifact, saying why.
            train_error = train_error or f"the strategy aggregated no model ({_drop_summary(train)})"
            log.warning("job %d round %d: %s; the model is kept", job_id, server_round, train_error)
            new_arrays, sha = arrays, parent_sha
        else:
            blob = array_record_to_bytes(new_arrays)
            sha = self.store.put(blob)
        train_s = time.monotonic() - train_started

        eval_started = time.monotonic()
        self.grid.reference_arrays = new_arrays
        eval_metrics = None
        eval_error = ""
        eval_replies: list[Message] = []
        try:
            eval_replies = self._exchange(
                lambda: strategy.configure_evaluate(
                    server_round, new_arrays, evaluate_config(spec), self.grid
                ),
                settings.wait_for_nodes_s, settings.evaluate_deadline,
            )
            eval_error = unweighable(strategy, eval_replies)
            if not eval_error:
                eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)
        except _Stopping:
            raise
        except Exception as exc:  # an evaluation shortfall or error does not fail the job
            eval_error = f"{type(exc).__name__}: {exc}"
            log.warning("job %d round %d: evaluation failed", job_id, server_round, exc_info=True)
        evaluate = self.grid.take_deliveries()
        if eval_metrics is None and evaluate and not eval_error:
            eval_error = f"the strategy aggregated no metrics ({_drop_summary(evaluate)})"
        if eval_error:
            log.warning("job %d round %d: no evaluation metrics: %s", job_id, server_round, eval_error)
        eval_s = time.monotonic() - eval_started

        nodes = [_node_result("train", d, replies) for d in train] + [
            _node_result("evaluate", d, eval_replies) for d in evaluate
        ]
        finished = time.time()
        record = RoundRecord(
            round=server_round,
            started_at=started,
            finished_at=finished,
            participants=len(train),
            dropped=len(train) - replied,
            train_metrics=metrics_dict(train_metrics),
            eval_metrics=metrics_dict(eval_metrics),
            bytes_down=sum(d.bytes_down for d in train + evaluate),
            bytes_up=sum(d.bytes_up for d in train + evaluate),
            duration_s=finished - started,
            train_duration_s=train_s,
            eval_duration_s=eval_s,
            artifact_sha=sha,
            nodes=nodes,
            train_error=train_error,
            eval_error=eval_error,
        )
        state = save_state(strategy, self.store)
        artifact = None if blob is None else ArtifactRecord(
            sha, len(blob), ARRAY_RECORD_ENCODING, job_id, server_round, parent_sha, finished
        )
        self.repo.commit_round(job_id, record, artifact, state)
        log.info("job %d round %d: %d/%d replied, %.2f s", job_id, server_round, replied,
                 len(train), record.duration_s)
        return new_arrays, sha

    def _exchange(self, configure: Callable[[], Any], wait_s: float, deadline_s: float) -> list:
        """configure -> send_and_receive, the two together bounded by the phase's deadline
        (a configure step that waits for nodes leaves the replies less time); stopping
        interrupts it."""
        try:
            self.grid.begin_phase(wait_s, deadline_s)
            messages = list(configure())
            return list(self.grid.send_and_receive(messages, timeout=deadline_s)) if messages else []
        except GridClosedError as exc:
            raise _Stopping from exc
        finally:
            self._check_stopping()

    def _check_stopping(self) -> None:
        if self._stopping or self.grid.closed:
            raise _Stopping


def unweighable(strategy: object, replies: list[Message]) -> str:
    """Why the strategy cannot weigh these replies, or '': each valid one reports weight 0 under
    the strategy's `weighted_by_key` ("num-examples"), and Flower's weighted means divide by the
    sum of the weights (ZeroDivisionError)."""
    key = getattr(strategy, "weighted_by_key", None)
    valid = [reply for reply in replies if not reply.has_error()]
    if not isinstance(key, str) or not valid:
        return ""
    weights = []
    for reply in valid:
        records = list(reply.content.metric_records.values())
        weight = records[0].get(key) if records else None
        if not isinstance(weight, int | float):
            return ""  # the strategy's own checks name what is missing
        weights.append(weight)
    if sum(weights) != 0:
        return ""
    return (f"every valid reply ({len(valid)}) reports {key} = 0, so there is no weighted mean "
            "to take; nothing was aggregated")


def _node_result(phase: str, delivery: Delivery, replies: list[Message]) -> NodeResult:
    return NodeResult(
        phase=phase,
        node_id=delivery.node_id,
        status=delivery.status,
        error=delivery.error,
        bytes_down=delivery.bytes_down,
        bytes_up=delivery.bytes_up,
        compute_s=delivery.compute_s,
        metrics=_reply_metrics(delivery, replies),
    )


def _reply_metrics(delivery: Delivery, replies: list[Message]) -> dict[str, Any] | None:
    """The metrics a node reported with its (valid) reply, for per-node tables."""
    if delivery.status != REPLIED:
        return None
    for reply in replies:
        if reply.metadata.src_node_id == delivery.node_id and not reply.has_error():
            records = list(reply.content.metric_records.values())
            return metrics_dict(records[0]) if records else None
    return None


def _drop_summary(deliveries: list[Delivery]) -> str:
    dropped = [d for d in deliveries if d.status != REPLIED]
    if not dropped:
        return "no node was sampled" if not deliveries else "all sampled nodes replied"
    return "; ".join(f"node {d.node_id}: {d.status} {d.error}".strip() for d in dropped[:5])
