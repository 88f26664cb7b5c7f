"""Mixed INT8/FP32 networks: chosen stages of a QAT subnet run in float, the rest in INT8.

On ONNX Runtime's CPU provider some blocks run slower in INT8 than in FP32 (hard-swish and
squeeze-excite stages: DESIGN.md, MobileNetV3-Small 0.84x), so keeping such a stage in float can make
a network faster and more accurate at once. A float stage here is a stage of the static QAT network
whose quantizers are switched off, with one exception: when the stage's consumer (the next stage or
the head) runs in INT8, the stage's output quantizer stays on, so the consumer gets the uint8 tensor
it was trained on and ONNX Runtime still fuses its first conv into an INT8 kernel. A float stage's
input needs nothing: the producer's output is quantized and the stage reads its dequantized values.
With stage 0 in float the network input is not quantized either.

The float stages compute with the QAT weights unquantized (no fine-tuning in float): what the
exported graph runs, so PyTorch's eval forward of :func:`keep_stages_float` and the ONNX model of
:func:`spaceevo.quant.qat.export_int8` with ``float_stages`` agree.
"""

from __future__ import annotations

import copy
from typing import Collection

import torch
from torch import nn

from spaceevo.errors import UsageError
from spaceevo.nn.static import StaticNet
from spaceevo.quant.lsq import LsqActivationQuantizer, LsqQuantizer


def check_float_stages(stage_count: int, stages: Collection[int]) -> list[int]:
    """``stages`` sorted without repeats, or a :class:`UsageError` naming the allowed stage indices
    of a network with ``stage_count`` stages."""
    bad = sorted(s for s in stages if not 0 <= s < stage_count)
    if bad:
        raise UsageError(
            f"float stages {bad} do not exist: the subnet has stages 0..{stage_count - 1} (0 is the stem)"
        )
    return sorted(set(stages))


def stage_output_quantizers(model: StaticNet) -> list[str]:
    """Per stage, the name of the activation quantizer that quantizes the stage's output: the last
    one its forward runs (a block's output is the last tensor it computes). Found by tracing one
    eval-mode forward of a zero image."""
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, LsqActivationQuantizer)}
    calls: list[str] = []
    hooks = [
        m.register_forward_hook(lambda module, args, out: calls.append(names[id(module)]))
        for m in model.modules()
        if isinstance(m, LsqActivationQuantizer)
    ]
    arch = model.arch
    was_training = model.training
    try:
        with torch.no_grad():
            resolution = arch.subnet.resolution
            model.eval()(torch.zeros(1, arch.in_channels, resolution, resolution))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    outputs = []
    for index in range(len(model.stages)):
        prefix = f"stages.{index}."
        inside = [name for name in calls if name.startswith(prefix)]
        if not inside:
            raise RuntimeError(f"stage {index} has no activation quantizer: is the model prepared for QAT?")
        outputs.append(inside[-1])
    return outputs


def keep_stages_float(model: StaticNet, stages: Collection[int]) -> StaticNet:
    """A copy of the static QAT ``model`` whose ``stages`` run in float (see the module docstring)."""
    chosen = check_float_stages(len(model.stages), stages)
    mixed = copy.deepcopy(model)
    if not chosen:
        return mixed
    outputs = stage_output_quantizers(mixed)
    last = len(mixed.stages) - 1
    keep = {outputs[s] for s in chosen if s == last or s + 1 not in chosen}
    for name, module in mixed.named_modules():
        in_float_stage = any(name.startswith(f"stages.{s}.") for s in chosen)
        if isinstance(module, LsqQuantizer) and in_float_stage and name not in keep:
            module.enabled = False
    if 0 in chosen and isinstance(mixed.input_quant, LsqQuantizer):
        mixed.input_quant.enabled = False
    return mixed

