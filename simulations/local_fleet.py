"""A real fleet on loopback: one coordinator process and N agent processes.

The demo, the round-latency benchmark and the end-to-end tests all need the same
thing: start `tinyfleet server start` on ephemeral ports, wait until it has
written its `server.json`, start agents with their own state dirs and data
streams, talk to the Admin service, and stop every process by its PID however
the caller exits. The fleet is set up as an operator would: the coordinator
requires an admin token (its generated DATA_DIR/admin-token unless one is given)
and every agent joins with its own single-use enrollment token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.server.admin_client import AdminClient


class FleetStartError(RuntimeError):
    """A process of the local fleet did not come up; the message carries its log tail."""


@dataclass
class AgentProcess:
    index: int
    device_id: str
    data: str
    state_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    enroll_token: str


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


class LocalFleet:
    """Context manager owning a coordinator and its agents under `root`."""

    def __init__(
        self,
        root: Path,
        *,
        admin_token: str | None = None,
        db_url: str | None = None,
        server_args: Sequence[str] = (),
        agent_args: Sequence[str] = (),
        ca: Path | None = None,
        verbose: bool = False,
    ) -> None:
        self.root = Path(root)
        self.data_dir = self.root / "coordinator"
        self.logs = self.root / "logs"
        self.admin_token = admin_token
        self.db_url = db_url
        self.server_args = list(server_args)
        self.agent_args = list(agent_args)
        self.ca = ca  # the CA that signed a TLS coordinator's certificate (admin client side)
        self.verbose = verbose
        self.server: subprocess.Popen[bytes] | None = None
        self.server_info: dict[str, object] = {}
        self.agents: list[AgentProcess] = []
        self._admin: AdminClient | None = None
        self._listen_port = 0
        self._http_port = 0

    # -- lifecycle ----------------------------------------------------------
    def __enter__(self) -> LocalFleet:
        self.logs.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _env(self) -> dict[str, str]:
        # The fleet passes its own tokens; an operator's from the environment would override them.
        tokens = ("TINYFLEET_ADMIN_TOKEN", "TINYFLEET_ENROLL_TOKEN")
        env = {k: v for k, v in os.environ.items() if k not in tokens}
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        # Many processes on few cores: one intra-op thread each keeps them from thrashing.
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def _cli(self) -> list[str]:
        return [sys.executable, "-m", "tinyfleet"] + (["-v"] if self.verbose else [])

    def start_server(self, timeout: float = 60.0, env: dict[str, str] | None = None) -> dict[str, object]:
        """Start the coordinator (again, after a kill: same data dir, same ports); `env` adds variables.
        Ready means its server.json names the process started here (a file a killed coordinator
        left behind does not count)."""
        from tinyfleet.server.daemon import read_ready_file

        cmd = [
            *self._cli(),
            "server",
            "start",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            f"127.0.0.1:{self._listen_port}",
            "--http",
            f"127.0.0.1:{self._http_port}",
        ]
        if self.db_url:
            cmd += ["--db", self.db_url]
        if self.admin_token:
            cmd += ["--admin-token", self.admin_token]
        cmd += self.server_args
        log_path = self.logs / "server.log"
        with log_path.open("ab") as log:
            self.server = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**self._env(), **(env or {})}
            )
        deadline = time.monotonic() + timeout
        while (info := read_ready_file(self.data_dir)) is None or info["pid"] != self.server.pid:
            if self.server.poll() is not None:
                raise FleetStartError(f"coordinator exited with {self.server.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise FleetStartError(f"coordinator not ready after {timeout:.0f}s:\n{_tail(log_path)}")
            time.sleep(0.05)
        self.server_info = info
        self._listen_port = int(str(self.server_info["listen"]).rsplit(":", 1)[1])
        self._http_port = int(str(self.server_info["http"]).rsplit(":", 1)[1])
        generated = self.data_dir / "admin-token"
        if self.admin_token is None and generated.exists():  # made by the coordinator (mode 0600)
            self.admin_token = generated.read_text().strip()
        return self.server_info

    def enroll(self, uses: int = 1, label: str = "", ttl_s: float = 24 * 3600.0) -> str:
        """A new enrollment token from the coordinator."""
        return str(self.admin().enroll(uses=uses, ttl_s=ttl_s, label=label).token)

    @property
    def address(self) -> str:
        return str(self.server_info["listen"])

    @property
    def http_address(self) -> str:
        return str(self.server_info["http"])

    def start_agent(
        self, data: str, *, device_id: str | None = None, enroll_token: str | None = None
    ) -> AgentProcess:
        """An agent process with its own state dir and, unless `enroll_token` is given ("" for
        none, as a rogue device would have), a fresh single-use enrollment token."""
        from tinyfleet.client.descriptions import minimal_thing_description

        index = len(self.agents)
        device_id = device_id or f"urn:tinyfleet:demo:agent-{index}"
        state_dir = self.root / f"agent-{index}"
        state_dir.mkdir(parents=True, exist_ok=True)
        device_file = state_dir / "device.td.json"
        device_file.write_text(json.dumps(minimal_thing_description(device_id), indent=2))
        log_path = self.logs / f"agent-{index}.log"
        token = self.enroll(label=f"local fleet agent-{index}") if enroll_token is None else enroll_token
        process = self._spawn_agent(state_dir, data, log_path, token)
        agent = AgentProcess(index, device_id, data, state_dir, log_path, process, token)
        self.agents.append(agent)
        return agent

    def restart_agent(self, agent: AgentProcess, sig: signal.Signals = signal.SIGKILL) -> None:
        """Kill an agent and start it again on its state dir: same identity and key (its used
        enrollment token is ignored), but everything it held in memory (its Flower Context, its
        stream's position) is gone."""
        agent.process.send_signal(sig)
        agent.process.wait(30)
        agent.process = self._spawn_agent(agent.state_dir, agent.data, agent.log_path, agent.enroll_token)

    def _spawn_agent(
        self, state_dir: Path, data: str, log_path: Path, enroll_token: str
    ) -> subprocess.Popen[bytes]:
        cmd = [
            *self._cli(),
            "agent",
            "run",
            "--server",
            self.address,
            "--state-dir",
            str(state_dir),
            "--device",
            str(state_dir / "device.td.json"),
            "--data",
            data,
            *self.agent_args,
        ]
        env = {**self._env(), "TINYFLEET_ENROLL_TOKEN": enroll_token}
        with log_path.open("ab") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def start_agents(self, data_specs: Sequence[str]) -> list[AgentProcess]:
        return [self.start_agent(spec) for spec in data_specs]

    def wait_online(self, count: int, timeout: float = 90.0) -> None:
        """Until the coordinator sees `count` devices online; TimeoutError names how many it saw."""
        deadline = time.monotonic() + timeout
        while (online := sum(d.online for d in self.admin().devices())) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{online} of {count} agents online after {timeout:g} s; logs in {self.logs}"
                )
            time.sleep(0.2)

    def kill_server(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(sig)
            self.server.wait(30)
        self._close_channel()

    def close(self) -> None:
        """Stop agents and the coordinator by PID (SIGTERM, then SIGKILL)."""
        self._close_channel()
        for agent in self.agents:
            _stop(agent.process)
        if self.server is not None:
            _stop(self.server)

    # -- admin API ----------------------------------------------------------
    def _close_channel(self) -> None:
        if self._admin is not None:
            self._admin.channel.close()
            self._admin = None

    def admin(self) -> AdminClient:
        """The operator's client for this fleet's coordinator (reconnects after a restart)."""
        if self._admin is None:
            self._admin = AdminClient(self.address, admin_token=self.admin_token, ca=self.ca)
        return self._admin

    def submit(self, spec_toml: str) -> str:
        return str(self.admin().submit(spec_toml).job_id)

    def wait(self, job_id: str) -> fleet_pb2.JobInfo:
        """Follow the job (server stream, no polling) and return its final state."""
        last = self.admin().job(job_id)
        for info in self.admin().watch(job_id):
            last = info
        return last
