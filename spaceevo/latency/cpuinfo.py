"""What a device fingerprint says about the CPU: model, ISA flags spaceevo cares about, machine.

Standard library only: besides this host, :mod:`spaceevo.latency.remote_worker` runs it on a device
reached over ssh, so both describe a CPU the same way.
"""

from __future__ import annotations

import platform
from pathlib import Path

ISA_FLAGS = {
    "avx2": "avx2",
    "avx512f": "avx512",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "amx_int8": "amx_int8",
    "asimd": "neon",
    "asimddp": "neon_dotprod",
    "i8mm": "neon_i8mm",
}
"""``/proc/cpuinfo`` flag (x86 ``flags``, Arm ``Features``) -> ISA name in fingerprints."""


def cpu_info() -> tuple[str, tuple[str, ...], str]:
    """This machine's CPU model, its ISA names (sorted, from :data:`ISA_FLAGS`) and machine type."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and value.strip():
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    isa = tuple(sorted({name for flag, name in ISA_FLAGS.items() if flag in flags}))
    return model, isa, platform.machine()
