"""A light round loop for simulations: the strategy's own methods, without `Strategy.start`.

`Strategy.start` logs every round and evaluates every round, which drowns an
online serial run of thousands of one-device rounds. This loop calls the same
`configure_train` / `send_and_receive` / `aggregate_train` sequence (so what
runs here runs on FleetGrid and Flower's grids), drains the grid's delivery
report for honest byte counts, and hands each round to a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

from tinyfleet.common.flower_adapter import ensure_task_identity
from tinyfleet.common.grids import REPLIED, Delivery, TrackingGrid


@dataclass
class RoundReport:
    """What one round did: who was asked, who answered, bytes each way, the aggregated metrics."""

    round: int
    deliveries: list[Delivery]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_down(self) -> int:
        return sum(d.bytes_down for d in self.deliveries)

    @property
    def bytes_up(self) -> int:
        return sum(d.bytes_up for d in self.deliveries)

    @property
    def replied(self) -> int:
        return sum(d.status == REPLIED for d in self.deliveries)


def run_rounds(
    strategy: Strategy,
    grid: TrackingGrid,
    arrays: ArrayRecord,
    rounds: int,
    *,
    train_config: ConfigRecord,
    first_round: int = 1,
    timeout: float | None = None,
    on_round: Callable[[RoundReport, ArrayRecord], bool | None] | None = None,
) -> ArrayRecord:
    """Run `rounds` training rounds; `on_round` may return True to stop early. Returns the model."""
    ensure_task_identity()  # strategies build Messages the way stock Flower strategies do
    grid.take_deliveries()
    for server_round in range(first_round, first_round + rounds):
        messages = list(
            strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid)
        )
        replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        report = RoundReport(
            round=server_round,
            deliveries=grid.take_deliveries(),
            metrics={k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)},
        )
        if on_round is not None and on_round(report, arrays):
            break
    return arrays
