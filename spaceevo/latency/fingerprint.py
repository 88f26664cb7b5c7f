"""Device fingerprint: what a latency figure is only valid for.

A latency table, a search result or an exported model records the fingerprint it was measured on;
a table from another fingerprint is never used silently. The fingerprint names the CPU (model, ISA
flags), the inference engine (:mod:`spaceevo.latency.engines`) and its version, and the thread
count, so tables of different engines on one CPU never mix.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field

from spaceevo.errors import UsageError
from spaceevo.latency.cpuinfo import ISA_FLAGS
from spaceevo.latency.engines import ENGINES, ORT_DEVICE, get_engine
from spaceevo.latency.engines.ort_session import PROVIDER as LEGACY_PROVIDER

LEGACY_ENGINE = ORT_DEVICE
"""Tables made before engines existed were all ONNX Runtime's CPU execution provider; their headers
name ``ort_version`` and ``provider`` instead of the engine (:meth:`DeviceFingerprint.from_dict`)."""
OVERRIDE_ENV = "SPACEEVO_FINGERPRINT_OVERRIDE"
OVERRIDE_FIELDS = ("cpu_model", "isa")


@dataclass(frozen=True)
class DeviceFingerprint:
    """CPU model, ISA flags, machine, inference engine (its ``--device`` name) and version, threads.

    ``device`` is the ``--device`` the fingerprint was probed through, to reach the engine again:
    ``ssh://…`` for a device measured over ssh, whose fingerprint is otherwise the one the device
    would give itself (its CPU, ``engine`` the engine run there), so its tables are the device's
    own. It is not part of what figures are valid for, and never stored (it may name a user).
    """

    cpu_model: str
    isa: tuple[str, ...]
    machine: str
    engine: str
    engine_version: str
    threads: int
    device: str = field(default="", compare=False, repr=False)

    @property
    def option(self) -> str:
        """The ``--device`` value that reaches the device: :attr:`device`, else the engine's name."""
        return self.device or self.engine

    @property
    def has_vnni(self) -> bool:
        return any(f in self.isa for f in ("avx512_vnni", "avx_vnni", "amx_int8"))

    @property
    def reduce_range(self) -> bool:
        """7-bit weights on x86 without VNNI (AVX2, AVX-512 without VNNI), per ONNX Runtime's advice:
        a property of the CPU's INT8 instructions, the same for every engine."""
        return self.machine in ("x86_64", "AMD64") and not self.has_vnni

    def _identity(self) -> dict:
        """What the slug's hash covers. For ONNX Runtime's CPU engine, the fields of the tables made
        before engines existed (``ort_version``, ``provider``), so their folder names stay valid."""
        if self.engine == LEGACY_ENGINE:
            return {
                "cpu_model": self.cpu_model, "isa": self.isa, "machine": self.machine,
                "ort_version": self.engine_version, "provider": LEGACY_PROVIDER, "threads": self.threads,
            }
        return self._fields()

    def _fields(self) -> dict:
        """The fields that identify the device, without :attr:`device`."""
        data = asdict(self)
        del data["device"]
        return data

    @property
    def slug(self) -> str:
        """Folder name: readable prefix (CPU, ISA, engine tag and version, threads) plus a hash of
        every field."""
        cpu = re.sub(r"[^a-z0-9]+", "-", self.cpu_model.lower()).strip("-")[:32] or "cpu"
        isa = "-".join(self.isa) or "noisa"
        tag = ENGINES[self.engine].tag if self.engine in ENGINES else re.sub(r"[^a-z0-9]+", "-", self.engine.lower())
        version = re.sub(r"[^A-Za-z0-9.]+", "-", self.engine_version)
        digest = hashlib.sha256(repr(sorted(self._identity().items())).encode()).hexdigest()[:8]
        return f"{cpu}_{isa}_{tag}{version}_t{self.threads}_{digest}"

    def to_dict(self) -> dict:
        data = self._fields()
        data["isa"] = list(self.isa)
        data["slug"] = self.slug
        data["reduce_range"] = self.reduce_range
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceFingerprint":
        """The fingerprint of a table header or artifact; one written before engines existed is
        ONNX Runtime's CPU engine with its ``ort_version``."""
        legacy = "engine" not in data
        return cls(
            cpu_model=data["cpu_model"],
            isa=tuple(data["isa"]),
            machine=data["machine"],
            engine=LEGACY_ENGINE if legacy else data["engine"],
            engine_version=data["ort_version"] if legacy else data["engine_version"],
            threads=int(data["threads"]),
        )

    def describe(self) -> str:
        engine = (
            ENGINES[self.engine].describe(self.engine_version) if self.engine in ENGINES
            else f"engine {self.engine} {self.engine_version}"
        )
        return (
            f"{self.cpu_model} [{', '.join(self.isa) or 'no SIMD flags'}], {engine}, {self.threads} thread(s), "
            f"reduce_range={self.reduce_range}"
        )


def _overridden(model: str, isa: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """CPU model and ISA flags with ``$SPACEEVO_FINGERPRINT_OVERRIDE`` applied: for tests and CI only.

    The value is ``cpu_model=NAME;isa=FLAG,FLAG`` (either field may be left out; ``isa=`` means no
    flags). It lets the test suite run as a host whose fingerprint matches no committed latency
    table, or as a host with the other ``reduce_range``, on any machine. Never set it for real work:
    tables and models made under it carry a fingerprint that is not this machine's.
    """
    value = os.environ.get(OVERRIDE_ENV, "").strip()
    if not value:
        return model, isa
    allowed_isa = sorted(set(ISA_FLAGS.values()))
    seen: dict[str, str] = {}
    for part in filter(str.strip, value.split(";")):
        key, sep, text = (s.strip() for s in part.partition("="))
        if not sep or key not in OVERRIDE_FIELDS or key in seen:
            raise UsageError(
                f"${OVERRIDE_ENV}={value!r}: bad field {part.strip()!r}; expected "
                f"'cpu_model=NAME;isa=FLAG,FLAG' with each of the fields {', '.join(OVERRIDE_FIELDS)} at most once"
            )
        seen[key] = text
    if "cpu_model" in seen:
        if not seen["cpu_model"]:
            raise UsageError(f"${OVERRIDE_ENV}={value!r}: cpu_model must not be empty")
        model = seen["cpu_model"]
    if "isa" in seen:
        flags = {f.strip() for f in seen["isa"].split(",") if f.strip()}
        unknown = sorted(flags - set(allowed_isa))
        if unknown:
            raise UsageError(
                f"${OVERRIDE_ENV}={value!r}: unknown isa flag(s) {', '.join(unknown)}; allowed: {', '.join(allowed_isa)}"
            )
        isa = tuple(sorted(flags))
    return model, isa


def device_fingerprint(device: str = "cpu", threads: int = 1) -> DeviceFingerprint:
    """Fingerprint of the device ``device`` names (:mod:`spaceevo.latency.engines`): this host, or
    the one an ``ssh://`` device reaches; tests and CI can replace its CPU model and ISA flags with
    ``$SPACEEVO_FINGERPRINT_OVERRIDE``."""
    engine = get_engine(device)
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    version = engine.version()
    model, isa, machine = engine.cpu()
    model, isa = _overridden(model, isa)
    return DeviceFingerprint(
        cpu_model=model,
        isa=isa,
        machine=machine,
        engine=engine.name,
        engine_version=version,
        threads=threads,
        device=device,
    )
