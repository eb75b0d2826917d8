"""Ping round trips of other agents while the coordinator decodes and checks a large reply.

The coordinator (in this process, on its own asyncio loop thread, as the daemon runs it)
sends each connected agent a keepalive Ping every heartbeat interval and times its Pong.
N agents (real `Agent`s in one child process) answer pings and send heartbeats; one more
agent (another process) answers train tasks with a large reply (48 MiB of float32 arrays by
default) that the coordinator decodes, checks for NaN/Inf and measures against the global
model (the update guard on, as a job with `max_update_ratio` has it). Where that work runs
decides whether the other agents wait for it: on the asyncio loop, every stream stalls for
as long as one reply takes.

Figures: the round trips of the pinging agents' pings, split by when each ping was sent:
while no reply was in flight (quiet), or while one was (from the task's sending until 0.5 s
after its reply was resolved); median, 99th percentile, maximum. Also, measured directly in
this process, how long decoding and checking one such reply takes. `--baseline PATH` puts a
record of the same benchmark run on other code (e.g. an older commit, from a git worktree)
beside this run's under "baseline".

With the checks off the loop, what still delays pings during a reply is gRPC receiving the
frame on the loop (and the machine's load): skipping the checks altogether leaves the same
tail. benchmarks/results/decode_stall.json has the figures, before and after.

    python -m tinyfleet.simulations.benchmarks.decode_stall [--agents 8] [--reply-mib 48] \\
        [--replies 10] [--json PATH] [--baseline PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine, Sequence
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from tinyfleet.common.arrays import from_numpy_dict
from tinyfleet.common.message_keys import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from tinyfleet.simulations.benchmarks.results_file import RunWatch, module_command, write_results

MIB = 1024 * 1024
#: Each tensor of the large model: 1024 x 1024 float32, 4 MiB (a model of many layers, not one blob).
TENSOR_SHAPE = (1024, 1024)
SENDER = "urn:tinyfleet:bench:large-reply"
#: The update guard's bound: far above the replies' update (1% noise), so every reply is kept.
MAX_UPDATE_RATIO = 10.0
AFTER_REPLY_S = 0.5


def large_model(reply_mib: int, seed: int, noise: float = 0.0) -> dict[str, np.ndarray]:
    """The global model (noise 0) or a device's weights near it, about `reply_mib` MiB."""
    tensors = max(1, reply_mib * MIB // (4 * TENSOR_SHAPE[0] * TENSOR_SHAPE[1]))
    rng = np.random.default_rng(seed)
    model = {f"layer{i}.weight": rng.standard_normal(TENSOR_SHAPE, dtype=np.float32) for i in range(tensors)}
    if noise:
        moved = np.random.default_rng(seed + 1)
        for values in model.values():
            values += noise * moved.standard_normal(TENSOR_SHAPE, dtype=np.float32)
    return model


def _agents_process(
    server: str, token: str, device_ids: Sequence[str], state_root: str, reply_mib: int, seed: int,
    stop: ProcessEvent,
) -> None:
    """Run real agents in this (child) process until `stop`; with `reply_mib`, their train
    handler answers with a model of that size."""
    from tinyfleet.client.agent import Agent, AgentConfig
    from tinyfleet.client.descriptions import minimal_description
    from tinyfleet.client.handlers import HandlerRegistry
    from tinyfleet.client.state_dir import StateDir
    from tinyfleet.common.flower_adapter import reply_with_content

    logging.basicConfig(level=logging.WARNING)
    handlers = None
    if reply_mib:
        content = RecordDict({
            ARRAYS_KEY: from_numpy_dict(large_model(reply_mib, seed, noise=0.01)),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: 1}),
        })
        handlers = HandlerRegistry()

        @handlers.register("train")
        def train(message: Message, context: Context) -> Message:
            return reply_with_content(message, content)

    agents = []
    for index, device_id in enumerate(device_ids):
        config = AgentConfig(
            server=server, state_dir=StateDir(Path(state_root) / str(index)), enroll_token=token,
            description=minimal_description(device_id, ram_kb=512 * 1024, flash_kb=8 * MIB,
                                            cpu="bench", cpu_cores=1),
        )
        agent = Agent(config, handlers=handlers)
        threading.Thread(target=agent.run, name=f"agent-{index}", daemon=True).start()
        agents.append(agent)
    stop.wait()
    for agent in agents:
        agent.stop()


class RoundTripSampler:
    """Collects every keepalive round trip of some nodes' sessions (they keep only the last 64)."""

    def __init__(self, hub: Any, nodes: set[int], every_s: float = 0.25) -> None:
        self.hub = hub
        self.nodes = nodes
        self.every_s = every_s
        self.trips: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtt-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.collect()

    def collect(self) -> None:
        for node in self.nodes:
            session = self.hub.session(node)
            if session is not None:
                for trip in list(session.round_trips):
                    self.trips[(node, trip.sent_at)] = trip.seconds

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.collect()

    def within(self, windows: Sequence[tuple[float, float]]) -> list[float]:
        """Round trips (ms) of pings sent inside any of the windows (time.monotonic())."""
        return [1000 * seconds for (_, sent_at), seconds in self.trips.items()
                if any(start <= sent_at <= end for start, end in windows)]


def _stats(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"samples": 0}
    ordered = sorted(values)
    return {
        "samples": len(ordered),
        "median": round(statistics.median(ordered), 2),
        "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 2),
        "max": round(ordered[-1], 2),
    }


def decode_and_check_ms(reply: Message, reference: ArrayRecord, repeats: int = 3) -> float:
    """Median time to decode and check one reply the way FleetGrid does it, in this process."""
    from tinyfleet.common.arrays import check_finite
    from tinyfleet.common.flower_adapter import message_from_bytes, message_to_bytes
    from tinyfleet.server.update_guard import UpdateGuard

    data = message_to_bytes(reply)
    guard = UpdateGuard(MAX_UPDATE_RATIO)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        message = message_from_bytes(data)
        for record in message.content.array_records.values():
            check_finite(record)
        guard.check(message.content, reference)
        times.append(1000 * (time.perf_counter() - started))
    return round(statistics.median(times), 1)


def code_commit() -> str:
    """The commit of the code measured (this module's checkout), '+' if it has local changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here.parents[1],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+" if dirty else "")


def measure(agents: int, reply_mib: int, replies: int, heartbeat_s: float, quiet_s: float,
            seed: int = 0) -> dict[str, Any]:
    from tinyfleet.common.grids import REPLIED
    from tinyfleet.server.auth import hash_enrollment_token, new_enrollment_id, new_enrollment_token
    from tinyfleet.server.daemon import Coordinator, ServerSettings
    from tinyfleet.server.update_guard import UpdateGuard

    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="coordinator-loop", daemon=True)
    loop_thread.start()

    def on_loop(coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, loop).result(120)

    with tempfile.TemporaryDirectory(prefix="decode-stall-") as tmp:
        coordinator = Coordinator(ServerSettings(
            data_dir=Path(tmp) / "coordinator", listen="127.0.0.1:0", heartbeat_interval_s=heartbeat_s,
        ))
        on_loop(coordinator.start())
        token = new_enrollment_token()
        coordinator.repo.create_enrollment(new_enrollment_id(), hash_enrollment_token(token),
                                           label="decode-stall", uses=agents + 1, ttl_s=3600)
        context = mp.get_context("spawn")
        stop = context.Event()
        address = coordinator.listen_address
        pingers = [f"urn:tinyfleet:bench:pinger-{i}" for i in range(agents)]
        children = [
            context.Process(target=_agents_process,
                            args=(address, token, pingers, f"{tmp}/pingers", 0, seed, stop)),
            context.Process(target=_agents_process,
                            args=(address, token, [SENDER], f"{tmp}/sender", reply_mib, seed, stop)),
        ]
        for child in children:
            child.start()
        try:
            grid = coordinator.grid
            if grid.wait_for_nodes(agents + 1, 300) < agents + 1:
                raise RuntimeError(f"only {len(grid.available_nodes())} of {agents + 1} agents connected")
            sender = coordinator.repo.get_device(SENDER)
            assert sender is not None
            sampler = RoundTripSampler(coordinator.hub, grid.available_nodes() - {sender.node_id})
            sampler.start()
            reference = from_numpy_dict(large_model(reply_mib, seed))
            grid.reference_arrays = reference
            grid.update_guard = UpdateGuard(MAX_UPDATE_RATIO)
            time.sleep(4 * heartbeat_s)  # the first pings of every stream
            quiet: list[tuple[float, float]] = []
            busy: list[tuple[float, float]] = []
            exchange_s: list[float] = []
            reply_bytes = 0
            answer: Message | None = None
            for index in range(replies):
                start = time.monotonic()
                time.sleep(quiet_s)
                quiet.append((start, time.monotonic()))
                sent = time.monotonic()
                task = grid.create_message(RecordDict({CONFIG_KEY: ConfigRecord({"index": index})}), "train",
                                           sender.node_id, str(index))
                answers = list(grid.send_and_receive([task], timeout=300))
                resolved = time.monotonic()
                [delivery] = grid.take_deliveries()
                if delivery.status != REPLIED:
                    raise RuntimeError(f"the large reply was refused: {delivery.status} {delivery.error}")
                answer, reply_bytes = answers[0], delivery.bytes_up
                exchange_s.append(round(resolved - sent, 3))
                time.sleep(AFTER_REPLY_S)
                busy.append((sent, time.monotonic()))
            sampler.stop()
            assert answer is not None
            return {
                "code_commit": code_commit(),
                "pinging_agents": agents,
                "ping_interval_s": heartbeat_s,
                "reply_bytes": reply_bytes,
                "replies": replies,
                "decode_and_check_ms": decode_and_check_ms(answer, reference),
                "exchange_seconds": exchange_s,
                "rtt_ms_quiet": _stats(sampler.within(quiet)),
                "rtt_ms_during_reply": _stats(sampler.within(busy)),
            }
        finally:
            stop.set()
            for child in children:
                child.join(15)
                if child.is_alive():
                    child.terminate()
                    child.join(5)
            on_loop(coordinator.stop())
            loop.call_soon_threadsafe(loop.stop)
            loop_thread.join(10)
            loop.close()


def print_table(result: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    runs = [("this run", result)] + ([("baseline", baseline)] if baseline else [])
    print(f"decode stall: {result['pinging_agents']} pinging agents (a ping every "
          f"{result['ping_interval_s']:g} s), {result['replies']} replies of "
          f"{result['reply_bytes'] / MIB:.1f} MiB")
    header = (f"{'code':<24} {'decode+check ms':>15} {'pings sent':<16} {'samples':>7} "
              f"{'median ms':>9} {'p99 ms':>8} {'max ms':>8}")
    print(header)
    print("-" * len(header))
    for label, run in runs:
        for when, key in (("while quiet", "rtt_ms_quiet"), ("during a reply", "rtt_ms_during_reply")):
            s = run[key]
            commit = run["code_commit"]
            code = f"{label} {commit[:10]}{'+' if commit.endswith('+') else ''}"
            print(f"{code:<24} {run['decode_and_check_ms']:>15.1f} {when:<16} {s['samples']:>7} "
                  f"{s.get('median', 0):>9.2f} {s.get('p99', 0):>8.2f} {s.get('max', 0):>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=8, help="agents that only answer pings (default 8)")
    parser.add_argument("--reply-mib", type=int, default=48, help="size of the large reply (default 48)")
    parser.add_argument("--replies", type=int, default=10, help="large replies, one at a time (default 10)")
    parser.add_argument("--ping-interval", type=float, default=0.5,
                        help="the coordinator's heartbeat interval: a ping each (default 0.5 s; a stream "
                             "silent for 3 is closed, and an agent encoding 48 MiB on a loaded machine "
                             "can be silent for 0.75 s)")
    parser.add_argument("--quiet", type=float, default=2.0,
                        help="seconds without a reply before each (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--baseline", type=Path,
                        help="a results file of this benchmark on other code, kept under 'baseline'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    watch = RunWatch()
    result = measure(args.agents, args.reply_mib, args.replies, args.ping_interval, args.quiet)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    print_table(result, baseline)
    if args.json:
        record = watch.record(module_command(__spec__.name, argv), result)
        if baseline is not None:
            record["baseline"] = baseline
        write_results(args.json, record)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
