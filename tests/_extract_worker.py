"""``spaceevo`` in a subprocess with stand-ins for everything that depends on the host or takes
long: the latency predictor (:mod:`_fake_latency`), the held-out fitness (a hash of the subnet,
after ``SPACEEVO_TEST_DELAY`` seconds) and the verification of answers (export, ONNX Runtime top-1
and device timing); ``SPACEEVO_TEST_GRACE`` shortens the heartbeat grace period. Every fitness evaluation appends ``eval <subnet>`` and every exported winner
``verify <file stem> <subnet>`` to ``SPACEEVO_TEST_LOG``, so tests can count them across processes.

    python tests/_extract_worker.py extract --run DIR ...
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _fake_latency  # noqa: E402


def _log(line: str) -> None:
    fd = os.open(os.environ["SPACEEVO_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def install() -> None:
    import onnx

    import spaceevo.deploy.evaluate as evaluate_module
    import spaceevo.latency.api as latency_api
    from spaceevo.deploy.evaluate import ExportReport
    from spaceevo.latency.measure import LatencyStats
    import spaceevo.storage as storage
    from spaceevo.extraction.fitness import HeldoutFitness

    _fake_latency.install()
    storage.GRACE_S = int(os.environ.get("SPACEEVO_TEST_GRACE", storage.GRACE_S))  # a killed worker's trial is retried after it
    delay = float(os.environ.get("SPACEEVO_TEST_DELAY", "0"))

    def fitness(self: HeldoutFitness, subnet) -> float:
        time.sleep(delay)
        encoding = subnet.encode()
        self.evaluations += 1
        _log(f"eval {encoding}")
        return int(hashlib.sha256(encoding.encode()).hexdigest()[:6], 16) % 10_000 / 100

    def export(run, subnet, output, **_):
        paths = (f"{output}_fp32.onnx", f"{output}_int8.onnx")
        time.sleep(delay)
        for path in paths:
            Path(path).write_bytes(b"onnx")
        _log(f"verify {Path(str(output)).name} {subnet}")
        return ExportReport("space", str(subnet), "qat", *paths, 0.0, 0.0, "fp32 phase", *paths, 0.0)

    def measure(models, *_):
        return [LatencyStats(0.01, 0.01, (0.01,) * 5) for _ in models], "latency table"

    HeldoutFitness.__call__ = fitness
    HeldoutFitness.datasets = property(lambda self: SimpleNamespace(test=None))
    evaluate_module.export_subnet = export
    evaluate_module.engine_top1 = lambda *_, **__: 50.0
    onnx.load_from_string = lambda data: data
    latency_api.measure_onnx = measure


if __name__ == "__main__":
    install()
    from spaceevo.cli import main

    sys.exit(main(sys.argv[1:]))
