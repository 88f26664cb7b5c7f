"""The reference model every guarded measurement times alongside its subjects.

A fixed, mid-sized INT8 block (MobileNetV2, 32 channels, 16x16, uint8 in and out): cheap to time,
and sensitive to the same machine phases as the segments and subnets it guards.
"""

from __future__ import annotations

from functools import lru_cache

from spaceevo.blocks import block_kind
from spaceevo.latency.fingerprint import DeviceFingerprint
from spaceevo.latency.engines import ORT_DEVICE, meter
from spaceevo.latency.measure import Meter
from spaceevo.latency.segments import Segment, segment_model

REFERENCE_SEGMENT = Segment(
    in_channels=32,
    input_size=16,
    first=False,
    block=block_kind("mbv2").variant().spec(32, 32, 3, 4.0, 1, 16, position=1),
)


@lru_cache(maxsize=4)
def reference_model(reduce_range: bool, device: str = ORT_DEVICE) -> bytes:
    """The reference segment's INT8 model for the engine ``device`` names."""
    return segment_model(REFERENCE_SEGMENT, reduce_range=reduce_range, device=device)


def stable_meter(
    fingerprint: DeviceFingerprint, canonical_ms: float | None = None, settle_s: float = 2.0
) -> Meter:
    """A settled :class:`~spaceevo.latency.measure.StableMeter` (or a remote engine's equivalent)
    for this device, on the scale of ``canonical_ms`` if given (a latency table's reference
    latency), else of the reference's latency measured now. The reference model is the one of the
    engine that runs there (its own format when it converts)."""
    guarded = meter(reference_model(fingerprint.reduce_range, fingerprint.engine), fingerprint, canonical_ms)
    guarded.settle(settle_s)
    return guarded
