"""The measurement program ``--device ssh://…`` runs on the remote device.

:mod:`spaceevo.latency.engines.ssh` ships it as source, with the modules in :data:`SHIPPED` (its only
imports from spaceevo), into a temporary folder there, so the remote needs Python 3, numpy and ONNX
Runtime, not spaceevo or PyTorch, and runs the very protocol of :mod:`spaceevo.latency.measure`.

It speaks on stdin and stdout: after an opening message (``hello``: the CPU, ONNX Runtime's version
and providers, or the required packages that are missing), each request is one JSON line, followed by
``size`` bytes of model for ``load``, and gets one JSON line back (``error`` when it failed):

- ``load`` (``threads``, ``size``): a model; answers its ``id``.
- ``run`` (``id``): one timed inference, its ``ms``.
- ``settle`` (``id``, ``canonical_ms``, ``seconds``, ``runs``): a meter guarded by model ``id``;
  answers ``baseline_ms`` and ``canonical_ms``.
- ``measure`` (``meter``, ``ids``, ``config``): the meter's measurement of those models; ``stats``.

Every request may carry ``free``: ids of models no longer needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from dataclasses import asdict
from typing import IO, Any

SHIPPED = (
    "spaceevo/latency/measure.py",
    "spaceevo/latency/cpuinfo.py",
    "spaceevo/latency/engines/ort_session.py",
    "spaceevo/latency/remote_worker.py",
)
"""What the remote folder holds, relative to the folder above the package (plus empty ``__init__.py``)."""
REQUIRED = ("numpy", "onnxruntime")
"""Packages the remote Python needs, by import name (the same as their pip names)."""


class Worker:
    """Models and meters of one session, and the requests that use them."""

    def __init__(self) -> None:
        from spaceevo.latency.measure import StableMeter, Timer

        self.timers: dict[int, Timer] = {}
        self.meters: dict[int, StableMeter] = {}
        self.loaded = 0

    def hello(self) -> dict[str, Any]:
        import onnxruntime as ort

        from spaceevo.latency.cpuinfo import cpu_info

        model, isa, machine = cpu_info()
        return {
            "cpu_model": model, "isa": list(isa), "machine": machine, "engine_version": ort.__version__,
            "providers": ort.get_available_providers(), "python": sys.executable, "folder": os.getcwd(),
        }

    def handle(self, request: dict[str, Any], payload: bytes) -> dict[str, Any]:
        from spaceevo.latency.engines.ort_session import OrtTimer
        from spaceevo.latency.measure import MeasureConfig, StableMeter

        for model in request.get("free", ()):
            self.timers.pop(model, None)
            self.meters.pop(model, None)
        op = request["op"]
        if op == "load":
            self.loaded += 1
            self.timers[self.loaded] = OrtTimer(payload, request["threads"])
            return {"id": self.loaded}
        if op == "run":
            return {"ms": self.timers[request["id"]].run_once()}
        if op == "settle":
            meter = StableMeter(self.timers[request["id"]], request["canonical_ms"])
            meter.settle(request["seconds"], request["runs"])
            self.meters[request["id"]] = meter
            return {"baseline_ms": meter.baseline_ms, "canonical_ms": meter.canonical_ms}
        if op == "measure":
            stats = self.meters[request["meter"]].measure(
                [self.timers[i] for i in request["ids"]], MeasureConfig(**request["config"])
            )
            return {"stats": [asdict(s) for s in stats]}
        raise ValueError(f"unknown request {op!r}")


def _reply(out: IO[bytes], message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


def main() -> None:
    """Serve requests until stdin closes. Anything else that writes to stdout (a library's warning)
    goes to stderr, which spaceevo shows when the session fails."""
    requests = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        _reply(out, {"missing": missing, "python": sys.executable})
        return
    worker = Worker()
    _reply(out, worker.hello())
    for line in requests:
        request = json.loads(line)
        payload = requests.read(request.get("size", 0))
        try:
            _reply(out, worker.handle(request, payload))
        except Exception as error:  # noqa: BLE001 - reported to spaceevo, which raises it there
            _reply(out, {"error": "".join(traceback.format_exception_only(type(error), error)).strip()})

