"""Benchmark: bytes of one device update per encoding, against dense fp32 measured in the same run.

For each zoo model a real update is made (5 inner steps of adaptation on one task:
a sine stream, or a 5-way task of real Omniglot characters as a device of the
Omniglot scenario sees it) and encoded dense, int8, top-P sparse and top-P sparse + int8. The table
shows the record bytes (the Arrays' data: .npy files for dense, one raw packed
buffer otherwise), the whole reply message on the wire (Flower serde, with its
metadata and metrics) and the ratio to dense, plus encode/decode time. It is the
uplink alone; the bytes of whole rounds, both ways, are what `tinyfleet sim run`
measures on SimGrid.

    python -m tinyfleet.simulations.benchmarks.update_bytes --data-dir ../shared/data \
        --json benchmarks/results/update_bytes.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from rich.console import Console
from rich.table import Table

from tinyfleet.client.data_sources import SineStream, open_source
from tinyfleet.client.omniglot import data_root
from tinyfleet.common import codec
from tinyfleet.common.flower_adapter import message_to_bytes, new_instruction, reply_with_content, stamp
from tinyfleet.common.learning import adapt, loss_fn
from tinyfleet.common.message_keys import METRICS_KEY, NUM_EXAMPLES_KEY
from tinyfleet.common.models import build_model
from tinyfleet.common.reptile_protocol import UPDATE_KEY
from tinyfleet.simulations.benchmarks.results_file import RunWatch, module_command, write_results

ENCODINGS = (
    ("dense fp32", 1.0, "none"),
    ("int8", 1.0, "int8"),
    ("top-P", None, "none"),
    ("top-P + int8", None, "int8"),
)


def real_update(model_name: str, seed: int, data_dir: Path) -> dict[str, np.ndarray]:
    """θ' - θ after 5 inner steps on one task: a sine stream, or steps cycling over 50 images of
    one 5-way Omniglot task (the Omniglot scenario's inner loop: Adam, batch 10)."""
    torch.manual_seed(seed)
    model = build_model(model_name, seed=seed)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model_name == "sine-mlp":
        sample = SineStream(seed=seed).next
        optimizer, lr = "sgd", 0.02
    else:
        x, y = open_source(f"omniglot:device=0,devices=10,seed={seed},dir={data_dir}").next(50)

        def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.randint(0, 50, (n,))
            return x[index], y[index]

        optimizer, lr = "adam", 0.001
    adapt(model, sample, steps=5, lr=lr, batch=10, criterion=loss_fn(model_name), optimizer=optimizer)
    return {k: (v.detach() - before[k]).numpy() for k, v in model.state_dict().items()}


def wire_bytes(record: ArrayRecord) -> int:
    """The reply message a device sends with this update, as serialized by Flower."""
    instruction = new_instruction(RecordDict(), "train.fedreptile", 1, run_id=1)
    stamp(instruction, run_id=1)
    metrics = MetricRecord({"train_loss": 0.1, NUM_EXAMPLES_KEY: 50})
    reply = reply_with_content(instruction, RecordDict({UPDATE_KEY: record, METRICS_KEY: metrics}))
    return len(message_to_bytes(reply))


def measure(model_name: str, top_p: float, seed: int, data_dir: Path) -> list[dict[str, object]]:
    update = real_update(model_name, seed, data_dir)
    layout = codec.Layout.of(update)
    rows: list[dict[str, object]] = []
    for label, p, quantize in ENCODINGS:
        fraction = top_p if p is None else p
        started = time.perf_counter()
        record = codec.encode(update, top_p=fraction, quantize=quantize)
        encoded = time.perf_counter()
        codec.decode(record, layout)
        decoded = time.perf_counter()
        rows.append(
            {
                "model": model_name,
                "encoding": label,
                "top_p": fraction,
                "quantize": quantize,
                "parameters": layout.numel,
                "record_bytes": sum(len(a.data) for a in record.values()),
                "message_bytes": wire_bytes(record),
                "encode_ms": 1e3 * (encoded - started),
                "decode_ms": 1e3 * (decoded - encoded),
            }
        )
    reference = rows[0]
    for row in rows:
        row["record_ratio_to_dense"] = reference["record_bytes"] / row["record_bytes"]  # type: ignore[operator]
        row["message_ratio_to_dense"] = reference["message_bytes"] / row["message_bytes"]  # type: ignore[operator]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--top-p", type=float, default=0.1, help="fraction sent by the sparse encodings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="folder holding omniglot/ (default: as sim run finds it)")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    watch, data_dir = RunWatch(), data_root(args.data_dir)
    rows = [
        r for name in ("sine-mlp", "omniglot-conv4") for r in measure(name, args.top_p, args.seed, data_dir)
    ]
    table = Table(title=f"one device update, top-P = {args.top_p:g} (ratios: dense fp32 / this)")
    for column in (
        "model",
        "encoding",
        "record B",
        "message B",
        "record ratio",
        "message ratio",
        "enc ms",
        "dec ms",
    ):
        table.add_column(column, justify="left" if column in ("model", "encoding") else "right")
    for r in rows:
        table.add_row(
            str(r["model"]),
            str(r["encoding"]),
            f"{r['record_bytes']:,}",
            f"{r['message_bytes']:,}",
            f"{r['record_ratio_to_dense']:.1f}",
            f"{r['message_ratio_to_dense']:.1f}",
            f"{r['encode_ms']:.2f}",
            f"{r['decode_ms']:.2f}",
        )
    Console(width=120).print(table)
    if args.json:
        command = module_command(__spec__.name, argv)
        figures = {"top_p": args.top_p, "seed": args.seed, "rows": rows}
        write_results(args.json, watch.record(command, figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
