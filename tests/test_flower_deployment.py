"""tinyfleet jobs on a stock Flower deployment: flower-superlink + 2 flower-supernodes + `flwr run`.

Everything is Flower's own processes and CLI on 127.0.0.1 (free ports, a temporary
FLWR_HOME so nothing touches ~/.flwr); the app is examples/flower-app, whose
ServerApp writes result.json and the final model into the run config's
`result-dir`, which is what the tests read. Flower polls (SuperNode and Grid every
3 s) and starts one ClientApp process per message, so each message exchange costs
seconds: the jobs are 2 rounds of a tiny model and still take about a minute each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from tinyfleet.client.omniglot import data_root
from tinyfleet.common.arrays import load_array_record
from tinyfleet.common.flower_adapter import array_record_from_bytes
from tinyfleet.common.jobspec import JobSpec, load_job_spec
from tinyfleet.common.models import build_model
from tinyfleet.common.proto_protocol import split_global
from tinyfleet.server.flower_serverapp import MODEL_FILE, RESULT_FILE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FLOWER_APP = REPO / "examples" / "flower-app"
BIN = Path(sys.executable).parent
CONNECTION = "tinyfleet-test"
NODE_DATA = ("sine:seed=1", "sine:seed=2")
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 400.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this test created (the process and the Flower workers it
    spawned: SuperExec, ServerApp/ClientApp processes), then SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.5)  # let the group's other members act on the signal too


@dataclasses.dataclass
class Deployment:
    root: Path
    env: dict[str, str]
    logs: list[Path]

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True, text=True,
            timeout=timeout, check=False,
        )

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for path in self.logs:
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            parts.append(f"--- {path.name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def run_job(self, spec: JobSpec, name: str) -> tuple[dict, Path, float]:
        """`flwr run` the example app with `spec`; the ServerApp's result.json, its folder, wall time."""
        job_file = self.root / f"{name}.toml"
        job_file.write_text(spec.to_toml())
        result_dir = self.root / f"{name}-result"
        started = time.monotonic()
        run = self.flwr(
            "run", str(FLOWER_APP), CONNECTION, "--stream",
            "--run-config", f"job='{job_file}' result-dir='{result_dir}'",
            timeout=RUN_TIMEOUT_S,
        )
        wall = time.monotonic() - started
        output = run.stdout + run.stderr
        match = re.search(r"Successfully started run (\d+)", output)
        assert match, f"flwr run did not start a run:\n{output}\n{self.log_tails()}"
        listed = self.flwr("ls", CONNECTION, "--run-id", match.group(1), "--format", "json")
        runs = json.loads(listed.stdout)["runs"]
        assert runs[0]["status"] == "finished:completed", f"{runs[0]}\n{output}\n{self.log_tails()}"
        assert (result_dir / RESULT_FILE).is_file(), f"no result written:\n{output}\n{self.log_tails()}"
        print(f"{name}: flwr run took {wall:.1f} s")
        return json.loads((result_dir / RESULT_FILE).read_text()), result_dir, wall


@contextlib.contextmanager
def flower_deployment(root: Path, node_data: Sequence[str]) -> Iterator[Deployment]:
    """A SuperLink and one SuperNode per data spec under `root`, stopped on exit."""
    home = root / "flwr-home"
    home.mkdir()
    superlink_port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{superlink_port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperExec starts flwr-* by name
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # default 1 s; SuperNode/Grid polls stay at 3 s
    }
    commands = {
        "superlink": [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(superlink_port),
            "--disable-runtime-dependency-installation",
        ],
    }
    for i, data in enumerate(node_data, start=1):
        commands[f"supernode-{i}"] = [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
            "--host", "127.0.0.1", "--port", str(_free_port()), "--node-config", f"data='{data}'",
        ]
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        for name, command in commands.items():
            log = root / f"{name}.log"
            logs.append(log)
            with log.open("wb") as out:
                procs.append(subprocess.Popen(
                    [str(BIN / command[0]), *command[1:]], env=env, cwd=root, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                ))
        deployment = Deployment(root, env, logs)
        if not _wait_for_port(superlink_port, procs[0], START_TIMEOUT_S):
            pytest.fail(f"flower-superlink did not listen on {superlink_port}:\n{deployment.log_tails()}")
        yield deployment
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with flower_deployment(tmp_path_factory.mktemp("flower"), NODE_DATA) as running:
        yield running


def test_fedavg_job_with_tinyfleet_handlers_on_flower(deployment: Deployment) -> None:
    base = load_job_spec(FLOWER_APP / "sine-fedavg.toml")
    spec = dataclasses.replace(base, name="flower-fedavg", rounds=2)
    summary, result_dir, _ = deployment.run_job(spec, "fedavg")

    assert len(summary["nodes"]) == 2 and summary["job"]["strategy"] == "fedavg"
    assert set(summary["train_metrics"]) == {"1", "2"} and set(summary["evaluate_metrics"]) == {"1", "2"}
    for metrics in summary["train_metrics"].values():
        assert np.isfinite(metrics["train_loss"])
    for metrics in summary["evaluate_metrics"].values():
        assert np.isfinite(metrics["eval_loss"])
    blob = (result_dir / MODEL_FILE).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == summary["model"]["sha256"]
    model = build_model(spec.model)
    load_array_record(model, array_record_from_bytes(blob))  # the trained model came back whole
    initial = build_model(spec.model, seed=spec.seed).state_dict()
    assert not np.allclose(model.state_dict()["0.weight"].numpy(), initial["0.weight"].numpy())


def test_fedreptile_with_compressed_links_on_flower(deployment: Deployment) -> None:
    """Parallel FedReptile, top-P + int8 both ways: round 2 sends each SuperNode only a delta
    against the replica its ClientApp kept in `context.state`, so both nodes answering round 2
    shows Flower carried that state between the per-message ClientApp processes."""
    spec = JobSpec(
        name="flower-fedreptile",
        strategy="fedreptile",
        model="sine-mlp",
        rounds=2,
        options={
            "serial": False, "epsilon": 0.5, "inner_steps": 5, "top_p": 0.5, "quantize": "int8",
            "compress_downlink": True, "evaluate_every": 2, "eval_steps": 8,
        },
        round=load_job_spec(FLOWER_APP / "sine-fedavg.toml").round,
    )
    summary, _, _ = deployment.run_job(spec, "fedreptile")

    assert [summary["train_metrics"][r]["nodes"] for r in ("1", "2")] == [2, 2]
    assert summary["train_metrics"]["2"]["epsilon"] == pytest.approx(0.5)
    assert set(summary["evaluate_metrics"]) == {"2"}  # evaluate_every = 2
    evaluated = summary["evaluate_metrics"]["2"]
    assert evaluated["loss_after"] < evaluated["loss_before"]  # K-shot adaptation from the meta-model


@pytest.mark.skipif(not (data_root() / "occupancy").is_dir(), reason="UCI occupancy data not found")
def test_fedproto_on_flower(tmp_path: Path) -> None:
    """FedProto on two SuperNodes streaming occupancy rooms. Round 2 sends no backbone: the nodes
    answer with the one their ClientApp kept in `context.state` in round 1, and their replies,
    numbered after round 1's acknowledgement, are merged once: every row streamed, counted once."""
    spec = JobSpec(
        name="flower-fedproto",
        strategy="fedproto",
        model="identity",
        rounds=2,
        options={"samples_per_round": 200, "eval_samples": 500},
        round=load_job_spec(FLOWER_APP / "sine-fedavg.toml").round,
    )
    with flower_deployment(tmp_path, ("occupancy:room=0,rooms=2", "occupancy:room=1,rooms=2")) as rooms:
        summary, result_dir, _ = rooms.run_job(spec, "fedproto")

    assert [summary["train_metrics"][r]["nodes"] for r in ("1", "2")] == [2, 2]
    assert [summary["train_metrics"][r]["examples"] for r in ("1", "2")] == [400, 800]
    _, merged = split_global(array_record_from_bytes((result_dir / MODEL_FILE).read_bytes()))
    assert merged is not None and sum(merged.counts.values()) == 800
    assert set(summary["evaluate_metrics"]) == {"1", "2"}  # round 1's evaluation sent no backbone either
    assert summary["evaluate_metrics"]["2"]["accuracy"] > 0.8
