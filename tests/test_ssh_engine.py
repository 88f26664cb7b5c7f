"""``--device ssh://…`` against a real OpenSSH server on 127.0.0.1.

The module's fixture starts ``sshd`` as the current user on a free port, with a temporary host key
and authorized client key, and points spaceevo at a temporary ssh config (``$SPACEEVO_SSH_CONFIG``)
whose known_hosts holds that host key, so host keys are verified as they are for real devices. The
"remote" Python is this one (``$SPACEEVO_REMOTE_PYTHON``), as on a device with its own virtualenv.
Skipped where ``/usr/sbin/sshd`` is missing (``apt-get install openssh-server``; ``.ci/run`` does).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from spaceevo.cli import build_parser, main
from spaceevo.errors import UsageError
from spaceevo.latency.endtoend import measure_models
from spaceevo.latency.engines import get_engine
from spaceevo.latency.engines.ssh import REMOTE_PYTHON_ENV, SSH_CONFIG_ENV, SshDevice, SshEngine, close_sessions
from spaceevo.latency.fingerprint import device_fingerprint
from spaceevo.latency.measure import MeasureConfig
from spaceevo.latency.reference import REFERENCE_SEGMENT, stable_meter
from spaceevo.latency.segments import required_segments, segment_model
from spaceevo.latency.table import TABLE_FILE, LatencyTable, measure_segments
from spaceevo.space import load_space

SSHD = Path("/usr/sbin/sshd")
QUICK = MeasureConfig(warmup=5, rounds=5, runs_per_round=5, min_round_s=0.0)


@dataclass(frozen=True)
class Server:
    folder: Path
    port: int
    config: Path

    @property
    def device(self) -> str:
        return f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not SSHD.exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs OpenSSH (/usr/sbin/sshd, ssh, ssh-keygen): apt-get install openssh-server")
    folder = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key", "stranger_key"):
        _keygen(folder / key)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    port = _free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.skip(f"sshd did not start: {process.communicate()[1].decode(errors='replace').strip()}")
            time.sleep(0.05)
    host_key = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    config = folder / "ssh_config"
    config.write_text(
        f"Host *\n  IdentityFile {folder / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
    )
    yield Server(folder, port, config)
    process.terminate()
    process.wait()


@pytest.fixture
def remote(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """The server, spaceevo configured for it; every session this test opened is closed after it."""
    monkeypatch.setenv(SSH_CONFIG_ENV, str(server.config))
    monkeypatch.setenv(REMOTE_PYTHON_ENV, sys.executable)
    yield server
    close_sessions()


# ---- device strings ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, device", [
    ("ssh://pi@raspberrypi.local", SshDevice("raspberrypi.local", "pi")),
    ("ssh://me@10.0.0.7:2222/cpu", SshDevice("10.0.0.7", "me", 2222)),
    ("ssh://jetson", SshDevice("jetson")),
    ("ssh://u@[fe80::1]:22", SshDevice("fe80::1", "u", 22)),
])
def test_ssh_devices_parse(text: str, device: SshDevice) -> None:
    assert SshDevice.parse(text) == device
    assert SshDevice.parse(str(device)) == device


@pytest.mark.parametrize("text, message", [
    ("ssh://", "expected ssh://"), ("ssh://-oProxyCommand=x", "expected ssh://"), ("ssh://a b@h", "expected ssh://"),
    ("ssh://u@h:0", "port 0"), ("ssh://u@h/openvino", "runs cpu, not 'openvino'"),
])
def test_bad_ssh_devices_are_usage_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        get_engine(text)


@pytest.mark.parametrize("bad, message", [
    ("tpu", "unknown device 'tpu'; allowed: cpu, openvino, litert, or ssh://[user@]host[:port][/ENGINE]"),
    ("ssh://u@h:99999", "bad ssh device 'ssh://u@h:99999': port 99999 is not in 1-65535"),
])
def test_the_cli_takes_ssh_devices_and_says_what_is_allowed(bad: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    device = "ssh://pi@board:2222"
    assert parser.parse_args(["latency", "validate", "--space", "tiny", "--device", device]).device == device
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["latency", "build", "--space", "tiny", "--device", bad])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_accuracy_is_computed_here_by_the_same_engine() -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    images = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    remote = SshEngine(SshDevice.parse("ssh://pi@board")).classifier(model, 1)  # connects nowhere
    np.testing.assert_array_equal(remote(images), get_engine("cpu").classifier(model, 1)(images))


# ---- a real server -------------------------------------------------------------------------------


def test_a_remote_device_has_its_own_fingerprint_and_times_like_here(remote: Server) -> None:
    remote_fp = device_fingerprint(remote.device)
    local_fp = device_fingerprint("cpu")
    assert remote_fp == local_fp and remote_fp.slug == local_fp.slug  # the same CPU and engine: the same tables
    assert remote_fp.device == remote.device and remote.device not in str(remote_fp.to_dict())
    model = segment_model(REFERENCE_SEGMENT, reduce_range=remote_fp.reduce_range)
    figures = []
    for fp in (local_fp, remote_fp):
        meter = stable_meter(fp, settle_s=0.2)
        figures.append(measure_models([model], fp, QUICK, meter)[0].ms / meter.canonical_ms)
    # the reference model in its own units: near 1 on both sides (a property of the protocol, loosely)
    assert figures[1] == pytest.approx(figures[0], rel=0.5)


def _engine(device: str) -> SshEngine:
    engine = get_engine(device)
    assert isinstance(engine, SshEngine)
    return engine


def test_the_remote_folder_is_removed_when_the_session_ends(remote: Server) -> None:
    engine = _engine(remote.device)
    folder = Path(engine.session.hello()["folder"])
    assert (folder / "spaceevo" / "latency" / "remote_worker.py").exists()
    engine.session.close()
    assert not folder.exists()


def test_remote_runs_are_timed_there(remote: Server) -> None:
    engine = _engine(remote.device)
    timer = engine.timer(segment_model(REFERENCE_SEGMENT, reduce_range=False), threads=1)
    runs = [timer.run_once() for _ in range(5)]
    assert all(0 < ms < 1000 for ms in runs) and np.isfinite(runs).all()


def test_an_unreachable_host_is_a_usage_error(remote: Server) -> None:
    closed = f"ssh://{getpass.getuser()}@127.0.0.1:{_free_port()}"
    with pytest.raises(UsageError, match=r"cannot reach ssh://.*Connection refused"):
        device_fingerprint(closed)


def test_the_cli_reports_an_unreachable_device_in_one_line(remote: Server, capsys: pytest.CaptureFixture[str]) -> None:
    closed = f"ssh://{getpass.getuser()}@127.0.0.1:{_free_port()}"
    assert main(["latency", "measure", "--space", "tiny-1111-0000", "--subnet", "min", "--device", closed]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spaceevo: error: cannot reach {closed}/cpu: ") and "Traceback" not in err


def test_a_refused_key_is_a_usage_error(remote: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    config = remote.folder / "stranger_config"
    config.write_text(remote.config.read_text().replace("client_key", "stranger_key"))
    monkeypatch.setenv(SSH_CONFIG_ENV, str(config))
    with pytest.raises(UsageError, match=r"the host refused the key .*Permission denied.*authorized_keys"):
        device_fingerprint(remote.device)


def test_an_unknown_host_key_is_refused(remote: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    config = remote.folder / "unknown_config"
    (remote.folder / "empty_known_hosts").write_text("")
    config.write_text(remote.config.read_text().replace("/known_hosts", "/empty_known_hosts"))
    monkeypatch.setenv(SSH_CONFIG_ENV, str(config))
    with pytest.raises(UsageError, match=r"host key could not be verified .*Host key verification failed"):
        device_fingerprint(remote.device)


def test_a_remote_without_python_is_named(remote: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REMOTE_PYTHON_ENV, "/nonexistent/python3")
    with pytest.raises(UsageError, match=r"no '/nonexistent/python3' on the remote; .*pip install numpy onnxruntime"):
        device_fingerprint(remote.device)


def _python_with(folder: Path, packages: tuple[str, ...]) -> Path:
    """This Python as a remote one whose only packages are ``packages``: ``python -S`` (no
    site-packages) with just them on its path."""
    import importlib

    site = folder / ("python-with-" + "-".join(packages))
    site.mkdir(exist_ok=True)
    for package in packages:
        if not (site / package).exists():
            (site / package).symlink_to(Path(importlib.import_module(package).__file__).parent)
    python = site / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    return python


def test_the_remote_needs_only_numpy_and_onnxruntime(remote: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither spaceevo nor PyTorch nor onnx there: the program brings what it imports of spaceevo."""
    monkeypatch.setenv(REMOTE_PYTHON_ENV, str(_python_with(remote.folder, ("numpy", "onnxruntime"))))
    fingerprint = device_fingerprint(remote.device)
    model = segment_model(REFERENCE_SEGMENT, reduce_range=fingerprint.reduce_range)
    stats = measure_models([model, model], fingerprint, QUICK, stable_meter(fingerprint, settle_s=0.1))
    assert all(s.ms > 0 and len(s.round_medians_ms) == QUICK.rounds for s in stats)


def test_a_remote_without_onnxruntime_is_named(remote: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REMOTE_PYTHON_ENV, str(_python_with(remote.folder, ("numpy",))))
    with pytest.raises(UsageError, match=r"lacks onnxruntime; install there: .* -m pip install onnxruntime") as error:
        device_fingerprint(remote.device)
    assert "numpy" not in str(error.value).split("lacks")[1].split(";")[0]


def test_a_resumed_table_is_measured_on_the_remote_device(remote: Server, tmp_path: Path) -> None:
    """A table read back from disk keeps the way to the device, so a resumed build times there."""
    fingerprint = device_fingerprint(remote.device)
    LatencyTable.open(tmp_path, fingerprint, create=True)
    table = LatencyTable.open(tmp_path, fingerprint)
    assert table.fingerprint.device == remote.device
    assert remote.device not in (tmp_path / fingerprint.slug / TABLE_FILE).read_text()
    segments = required_segments(load_space("tiny"))[:2]
    measure_segments(table, segments, workers=1, meter=stable_meter(fingerprint, settle_s=0.1))
    assert all(s.key in LatencyTable.open(tmp_path, fingerprint).entries for s in segments)
