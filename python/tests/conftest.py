"""A real ``ballastd`` per test: free port, fresh data dir, stopped at the end.

The binary is ``$BALLASTD`` or ``<repo>/target/debug/ballastd`` (build it with
``cargo build -p ballast-broker --bin ballastd``). Like the Rust tests
(broker/tests/it/support.rs), it listens on ``127.0.0.1:0`` and the test
reads the address from its first line of stdout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


def ballastd_path() -> Path:
    explicit = os.environ.get("BALLASTD")
    if explicit:
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "ballastd"


class Broker:
    """A ``ballastd`` child process on its own data directory."""

    def __init__(self, workdir: Path, extra_args: list[str], listen: str = "127.0.0.1:0") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "ballastd.log"
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self._spawn(listen)

    def _spawn(self, listen: str) -> None:
        binary = ballastd_path()
        if not binary.exists():
            raise RuntimeError(
                f"{binary} is missing: run `cargo build -p ballast-broker --bin ballastd` first"
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with open(self.log_path, "ab") as log:
                process = subprocess.Popen(
                    [
                        str(binary),
                        "--data-dir",
                        str(self.data_dir),
                        "--listen",
                        listen,
                        "--metrics-listen",
                        "127.0.0.1:0",
                        *self.extra_args,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env={**os.environ, "RUST_LOG": "info"},
                )
            assert process.stdout is not None
            line = process.stdout.readline().decode().strip()
            if line.startswith("listening on "):
                self.process = process
                self.address = line.removeprefix("listening on ")
                process.stdout.readline()  # "metrics on ..."
                return
            process.wait()
            log_text = self.log_path.read_text(errors="replace")
            # The port of a restarted broker can still be held for a moment.
            if "cannot listen" not in log_text or time.monotonic() > deadline:
                raise RuntimeError(f"ballastd did not start; its log:\n{log_text}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no chance to sync or clean up."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        """Starts it again on the same data directory and port."""
        self.kill()
        self._spawn(self.address)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[type[Broker] | object]:
    brokers: list[Broker] = []

    def start(*extra_args: str, listen: str = "127.0.0.1:0") -> Broker:
        broker = Broker(tmp_path / f"broker{len(brokers)}", list(extra_args), listen)
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture
def broker(broker_factory: object) -> Broker:
    return broker_factory()  # type: ignore[operator,no-any-return]
