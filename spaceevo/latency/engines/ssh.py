"""``--device ssh://[user@]host[:port][/ENGINE]``: latency measured on another machine over ssh.

For devices that cannot run the search (a Raspberry Pi, a Jetson, a phone's host): spaceevo builds
the models here and times them there. One ssh session per device and process runs the measurement
program (:mod:`spaceevo.latency.remote_worker`, shipped as source with the protocol it runs) in a
``mktemp -d`` folder that the remote shell removes when the session ends; models go over that
session and each group of them is measured there in one request, with the local protocol (warm-up,
interleaving, the reference-guarded :class:`~spaceevo.latency.measure.StableMeter`).

The session uses the system ``ssh`` with the user's keys, agent and config (``$SPACEEVO_SSH_CONFIG``
names another config file, ``ssh -F``), non-interactively (``BatchMode``: no password prompts) and
with host keys verified as that config says; spaceevo passes no secret and never turns the check
off. The remote needs Python 3 (``$SPACEEVO_REMOTE_PYTHON``, default ``python3``) with numpy and
ONNX Runtime; ``ENGINE`` (default ``cpu``) is the engine run there.

The device's fingerprint is the one it would give itself (its CPU, the engine's version there), so
its tables are the device's own, named without host or user. Accuracy (top-1) is computed by the same
engine on this machine, where the test set is.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import subprocess
import threading
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import onnx

from spaceevo.errors import SpaceEvoError, UsageError
from spaceevo.latency.engines import ENGINES, ORT_DEVICE, Classifier, Engine
from spaceevo.latency.engines.ort_session import PROVIDER
from spaceevo.latency.measure import LatencyStats, MeasureConfig, Meter, Timer
from spaceevo.latency.remote_worker import REQUIRED, SHIPPED

SSH_SCHEME = "ssh://"
SSH_FORM = "ssh://[user@]host[:port][/ENGINE]"
SSH_CONFIG_ENV = "SPACEEVO_SSH_CONFIG"
REMOTE_PYTHON_ENV = "SPACEEVO_REMOTE_PYTHON"
REMOTE_ENGINES = (ORT_DEVICE,)
"""Engines the measurement program runs."""
SSH_OPTIONS = ("-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=30")
NO_PYTHON = "spaceevo-remote: python not found"
_URL = re.compile(
    r"ssh://(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@)?"
    r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?(?:/(?P<engine>[A-Za-z0-9_-]+))?"
)
_UNREACHABLE = ("Connection refused", "No route to host", "Could not resolve hostname", "timed out",
                "Network is unreachable", "Connection closed by", "Connection reset")
_BOOTSTRAP = """\
import json, os, sys
for path, source in json.loads(sys.stdin.buffer.readline()).items():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as file:
        file.write(source)
sys.path.insert(0, os.getcwd())
from spaceevo.latency.remote_worker import main
main()
"""


@dataclass(frozen=True)
class SshDevice:
    """A parsed ``ssh://`` device: ssh's destination (user and port default to the ssh config's) and
    the engine to run there."""

    host: str
    user: str | None = None
    port: int | None = None
    engine: str = ORT_DEVICE

    @staticmethod
    def claims(device: str) -> bool:
        """Whether ``device`` is meant as an ssh device (then :meth:`parse` says if it is well formed)."""
        return device.startswith(SSH_SCHEME)

    @classmethod
    def parse(cls, device: str) -> "SshDevice":
        """The device ``device`` names; a :class:`UsageError` saying the expected form otherwise."""
        match = _URL.fullmatch(device)
        if match is None:
            raise UsageError(
                f"bad ssh device '{device}'; expected {SSH_FORM}, e.g. ssh://pi@raspberrypi.local or ssh://me@10.0.0.7:2222/cpu"
            )
        port = int(match["port"]) if match["port"] else None
        if port is not None and not 1 <= port <= 65535:
            raise UsageError(f"bad ssh device '{device}': port {port} is not in 1-65535")
        engine = match["engine"] or ORT_DEVICE
        if engine not in REMOTE_ENGINES:
            raise UsageError(f"bad ssh device '{device}': over ssh spaceevo runs {', '.join(REMOTE_ENGINES)}, not '{engine}'")
        return cls(host=match["host"].strip("[]"), user=match["user"], port=port, engine=engine)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (f"{SSH_SCHEME}{self.user + '@' if self.user else ''}{host}"
                f"{f':{self.port}' if self.port else ''}/{self.engine}")

    def ssh_command(self, remote: str) -> list[str]:
        """``ssh`` running the shell command ``remote`` on the device."""
        command = ["ssh", *SSH_OPTIONS]
        config = os.environ.get(SSH_CONFIG_ENV)
        if config:
            command += ["-F", config]
        if self.port:
            command += ["-p", str(self.port)]
        if self.user:
            command += ["-l", self.user]
        return command + ["--", self.host, remote]


def shipped_sources() -> dict[str, str]:
    """The measurement program's files by path in its remote folder, with empty package markers."""
    root = Path(__file__).resolve().parents[3]
    files = {path: (root / path).read_text() for path in SHIPPED}
    for path in SHIPPED:
        for package in PurePosixPath(path).parents[:-1]:
            files.setdefault(f"{package}/__init__.py", "")
    return files


def remote_command(python: str) -> str:
    """The remote shell's part: a private folder removed on exit, then the program in it."""
    python = shlex.quote(python)
    return (
        'd=$(mktemp -d "${TMPDIR:-/tmp}/spaceevo.XXXXXX") || exit 1; '
        "trap 'rm -rf \"$d\"' EXIT; trap 'exit 1' HUP INT TERM; cd \"$d\" || exit 1; "
        f"command -v {python} >/dev/null 2>&1 || {{ echo '{NO_PYTHON}' >&2; exit 127; }}; "
        f"{python} -c {shlex.quote(_BOOTSTRAP)}"
    )


class RemoteSession:
    """The measurement program on one device, over one ssh session: opened on first use, closed
    by :func:`close_sessions` (which ends the program and removes its folder)."""

    def __init__(self, device: SshDevice):
        self.device = device
        self.python = os.environ.get(REMOTE_PYTHON_ENV, "python3")
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: deque[str] = deque(maxlen=40)
        self._hello: dict[str, Any] | None = None
        self._unused: list[int] = []

    def hello(self) -> dict[str, Any]:
        """The program's opening message (the remote CPU and ONNX Runtime), connecting if needed."""
        if self._hello is None:
            self._start()
        assert self._hello is not None
        return self._hello

    def call(self, request: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
        """One request and its answer; a :class:`SpaceEvoError` with the remote's message if it failed."""
        self.hello()
        request = dict(request, size=len(payload), free=self._unused)
        self._unused = []
        self._send(json.dumps(request).encode() + b"\n" + payload)
        answer = self._receive()
        if "error" in answer:
            raise SpaceEvoError(f"{self.device}: the remote measurement failed: {answer['error']}")
        return answer

    def free(self, model: int) -> None:
        """Forget model ``model`` there with the next request."""
        self._unused.append(model)

    def close(self) -> None:
        """End the program (it exits when its input closes) and the session."""
        process, self._process, self._hello = self._process, None, None
        if process is None:
            return
        try:
            process.stdin.close()  # type: ignore[union-attr]
            process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()

    def _start(self) -> None:
        command = self.device.ssh_command(remote_command(self.python))
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise UsageError(f"--device {self.device} needs the OpenSSH client (ssh) on this machine") from None
        self._stderr.clear()
        threading.Thread(target=self._collect_stderr, args=(self._process,), daemon=True).start()
        self._send(json.dumps(shipped_sources()).encode() + b"\n")
        hello = self._receive()
        if "missing" in hello:
            self.close()
            missing = " ".join(hello["missing"])
            raise UsageError(
                f"{self.device}: the remote Python ({hello['python']}) lacks {', '.join(hello['missing'])}; "
                f"install there: {self.python} -m pip install {missing} (or set ${REMOTE_PYTHON_ENV} to a Python that has them)"
            )
        if PROVIDER not in hello["providers"]:
            self.close()
            raise UsageError(f"{self.device}: ONNX Runtime there has no {PROVIDER}; available: {hello['providers']}")
        self._hello = hello

    def _collect_stderr(self, process: subprocess.Popen[bytes]) -> None:
        for line in process.stderr:  # type: ignore[union-attr]
            self._stderr.append(line.decode(errors="replace").rstrip())

    def _send(self, data: bytes) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(data)
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._failure() from None

    def _receive(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise self._failure()
        return json.loads(line)

    def _failure(self) -> SpaceEvoError:
        """Why the session ended, from ssh's exit code and messages; the session is closed."""
        assert self._process is not None
        process = self._process
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        self._process, self._hello = None, None
        process.stderr.close()  # type: ignore[union-attr]
        lines = [line for line in self._stderr if line.strip()]
        said = "; ".join(lines[-3:]) or f"exit code {code}"
        device = self.device
        if code == 127 and NO_PYTHON in lines:
            return UsageError(
                f"{device}: no '{self.python}' on the remote; install Python 3 there with numpy and ONNX Runtime "
                f"(python3 -m pip install {' '.join(REQUIRED)}), or set ${REMOTE_PYTHON_ENV} to a Python that has them"
            )
        if code == 255 and any("Permission denied" in line for line in lines):
            return UsageError(
                f"{device}: the host refused the key ({said}); add this machine's public key to the user's "
                "~/.ssh/authorized_keys there, or name the key in your ssh config (IdentityFile). spaceevo runs "
                "ssh without prompts (BatchMode), so a password or passphrase must come from ssh-agent"
            )
        if code == 255 and any("Host key verification failed" in line for line in lines):
            return UsageError(
                f"{device}: its host key could not be verified ({said}); connect once with ssh to check and accept it "
                "(spaceevo never skips the check)"
            )
        if code == 255 and any(reason in line for line in lines for reason in _UNREACHABLE):
            return UsageError(f"cannot reach {device}: {said}")
        return SpaceEvoError(f"{device}: the remote measurement ended ({said})")


class RemoteTimer(Timer):
    """A model loaded on the remote device; a run is timed there (one round trip each, so the
    protocol times many at once with :class:`RemoteMeter`)."""

    def __init__(self, session: RemoteSession, model: onnx.ModelProto | bytes, threads: int):
        self.session = session
        data = model if isinstance(model, bytes) else model.SerializeToString()
        self.id: int = session.call({"op": "load", "threads": threads}, data)["id"]
        weakref.finalize(self, session.free, self.id)

    def infer(self) -> None:
        self.run_once()

    def run_once(self) -> float:
        return float(self.session.call({"op": "run", "id": self.id})["ms"])


class RemoteMeter(Meter):
    """A :class:`~spaceevo.latency.measure.StableMeter` on the remote device, guarded by
    ``reference``; each :meth:`measure` is one request."""

    def __init__(self, reference: RemoteTimer, canonical_ms: float | None):
        self.reference = reference
        self.canonical_ms = canonical_ms
        self.baseline_ms: float | None = None

    def settle(self, seconds: float = 2.0, runs: int = 200) -> float:
        answer = self.reference.session.call(
            {"op": "settle", "id": self.reference.id, "canonical_ms": self.canonical_ms, "seconds": seconds, "runs": runs}
        )
        self.baseline_ms, self.canonical_ms = answer["baseline_ms"], answer["canonical_ms"]
        return answer["baseline_ms"]

    def measure(self, timers: Sequence[Timer], config: MeasureConfig) -> list[LatencyStats]:
        if self.baseline_ms is None:
            self.settle()
        session = self.reference.session
        remote = [t for t in timers if isinstance(t, RemoteTimer) and t.session is session]
        if len(remote) != len(timers):
            raise TypeError("a remote meter measures models loaded in its own session")
        answer = session.call(
            {"op": "measure", "meter": self.reference.id, "ids": [t.id for t in remote], "config": asdict(config)}
        )
        return [LatencyStats(**dict(s, round_medians_ms=tuple(s["round_medians_ms"]))) for s in answer["stats"]]


class SshEngine(Engine):
    """An engine of :data:`~spaceevo.latency.engines.ENGINES` run on a device reached over ssh."""

    def __init__(self, device: SshDevice):
        local = ENGINES[device.engine]
        self.name, self.tag, self.label, self.target = local.name, local.tag, local.label, local.target
        self.package, self.extra = local.package, local.extra
        self.device = device
        self.session = RemoteSession(device)

    def _version(self) -> str:
        return str(self.session.hello()["engine_version"])

    def cpu(self) -> tuple[str, tuple[str, ...], str]:
        hello = self.session.hello()
        return hello["cpu_model"], tuple(hello["isa"]), hello["machine"]

    def timer(self, model: onnx.ModelProto | bytes, threads: int) -> Timer:
        return RemoteTimer(self.session, model, threads)

    def meter(self, reference: bytes, threads: int, canonical_ms: float | None) -> Meter:
        return RemoteMeter(RemoteTimer(self.session, reference, threads), canonical_ms)

    def classifier(self, model: onnx.ModelProto, threads: int) -> Classifier:
        """The same engine on this machine: top-1 is a property of the model and the engine, and
        test sets stay here."""
        return ENGINES[self.device.engine].classifier(model, threads)


_ENGINES: dict[SshDevice, SshEngine] = {}


def ssh_engine(device: SshDevice) -> SshEngine:
    """The one engine (and session) of ``device`` in this process."""
    if device not in _ENGINES:
        _ENGINES[device] = SshEngine(device)
    return _ENGINES[device]


@atexit.register
def close_sessions() -> None:
    """End every ssh session of this process (its remote folder goes with it); run at exit."""
    for engine in _ENGINES.values():
        engine.session.close()
    _ENGINES.clear()
