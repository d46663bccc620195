"""Start `editserve serve` as a real subprocess on free ports and talk to it over a socket."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from editserve.client import EditserveClient


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    # EditserveClient options (TLS files, token) that client() uses by default
    client_options: dict = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kw) -> EditserveClient:
        return EditserveClient(self.target, **{**self.client_options, **kw})

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Value of one sample in the scraped exposition (0 if absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if "{" in key:
                metric, _, rest = key.partition("{")
                found = ",".join(sorted(rest.rstrip("}").split(",")))
            else:
                metric, found = key, ""
            if metric == name and found == want:
                return float(value)
        return 0.0

    def wait_idle(self, timeout: float = 10) -> None:
        """Wait until no generation RPC is in flight (cancelled streams wind down async)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.metric("editserve_requests_in_flight", rpc=r) == 0 for r in ("Generate", "GenerateStream")):
                return
            time.sleep(0.05)
        raise TimeoutError("generation requests still in flight")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def _address_space_limit(limit: int):
    """A preexec_fn capping the child's address space (RLIMIT_AS) at ``limit`` bytes."""

    def apply() -> None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        capped = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (capped, capped))

    return apply


def start_server(model: str, state_dir: Path, log_dir: Path, *extra: str, wait: bool = True,
                 timeout: float = 300, client_options: dict | None = None,
                 memory_limit_bytes: int | None = None) -> ServerProcess:
    """``client_options``: how to reach it (TLS files, token), for the health wait and client().
    ``memory_limit_bytes``: an address-space limit, so a runaway allocation fails in the server
    (a MemoryError it must answer) instead of exhausting the machine."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port_file = log_dir / f"ports-{time.monotonic_ns()}.json"
    log_path = log_dir / f"server-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "editserve.client.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", "--state-dir", str(state_dir), "--threads", "1",
           "--port-file", str(port_file), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log_file = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    preexec = _address_space_limit(memory_limit_bytes) if memory_limit_bytes else None
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"server did not open its ports:\n{log_path.read_text()}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    server = ServerProcess(proc, ports["grpc_port"], ports["metrics_port"], log_path, dict(client_options or {}))
    if wait:
        with server.client() as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
                try:
                    if client.health(timeout=1) == "SERVING":
                        break
                except Exception:  # noqa: BLE001
                    pass
                if time.monotonic() > deadline:
                    server.kill()
                    raise TimeoutError(f"server not SERVING in {timeout}s:\n{server.log()}")
                time.sleep(0.1)
    return server
