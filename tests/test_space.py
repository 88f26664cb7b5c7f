"""Tests of the hyperspace language and the candidate-space / subnet encodings (spaceevo.space)."""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path

import pytest
import yaml

from spaceevo import space as S
from spaceevo.blocks import BlockSpec, make_divisible
from spaceevo.errors import ConfigError, EncodingError, SpaceEvoError, UsageError

# Published SpaceEvo search results (microsoft/Moonlit, MIT licence), verbatim: shipped with the tests.
PUBLISHED_YAML = Path(__file__).resolve().parent / "data" / "spaceevo_published.yaml"
PUBLISHED_SPACE = "onnxw-151122-023231"
# SEQnet@vnni-A0 as written in DESIGN.md (published SpaceEvo artifact), checked against the file.
SEQNET_VNNI_A0 = (
    "d1#1#2#2#2#2#2#1_k3#3#3#3#3#3#3#3#3#3#3#3#3_w16#16#32#32#64#64#112#112#144#144#240#240#320"
    "_e0#0.5#4.0#4.0#1.0#1.0#4.0#4.0#4.0#4.0#4.0#4.0#4.0_r160"
)
SIX_BLOCK_TYPES = {
    0: "mbv1_dual",
    1: "mbv2",
    2: "mbv3_se",
    3: "resnet",
    4: "resnet_se",
    5: "fused_mbconv",
}
TINY_YAML = S.SEARCH_SPACES_DIR / "tiny.yaml"
# A valid subnet of tiny-1111-0000 (stem + 4 stages; windows [16,24] [32,48] [64,80] [96,112]).
TINY_OK = "d1#1#1#1#1_k3#3#3#3#3_w16#16#32#64#96_e0#3.0#3.0#3.0#3.0_r28"


@functools.lru_cache(maxsize=None)
def hyperspace(name: str) -> S.Hyperspace:
    return S.load_hyperspace(name)


def published_space() -> S.CandidateSpace:
    return hyperspace("onnxw").candidate_space(PUBLISHED_SPACE)


def tiny_space() -> S.CandidateSpace:
    return hyperspace("tiny").candidate_space("tiny-1111-0000")


# ---------------------------------------------------------------------------------------------
# Shipped hyperspaces


def test_available_hyperspaces_lists_the_shipped_files():
    names = S.available_hyperspaces()
    assert {"onnxw", "tiny", "mobilenetv3"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", S.available_hyperspaces())
def test_every_shipped_hyperspace_loads(name):
    h = S.load_hyperspace(name)
    assert h.name == name
    assert h.searchable_stages, "every hyperspace needs a searchable stage"
    assert h.resolutions and h.num_classes > 0 and h.in_channels > 0
    assert len(h.head.widths) == 2
    assert re.fullmatch(r"[0-9a-f]{12}", h.digest)
    # its homogeneous seeds (if any) are valid candidate spaces that round-trip
    for cs in h.homogeneous_spaces():
        assert h.candidate_space(cs.encoding) == cs
    # loading twice gives equal objects and the same digest
    again = S.load_hyperspace(name)
    assert again == h and again.digest == h.digest


def test_onnxw_stages_and_windows_match_design():
    h = hyperspace("onnxw")
    searchable = h.searchable_stages
    assert [s.name for s in searchable] == [f"stage{i}" for i in range(1, 7)]
    expected = {
        # name: (widths, window size, number of windows, depths, stride)
        "stage1": ([32, 48, 64], 2, 2, [2, 3, 4], 2),
        "stage2": (list(range(32, 97, 16)), 2, 4, [2, 3, 4], 2),
        "stage3": (list(range(64, 145, 16)), 3, 4, [2, 3, 4, 5, 6], 2),
        "stage4": (list(range(112, 193, 16)), 3, 4, [2, 3, 4, 5, 6], 1),
        "stage5": (list(range(192, 305, 16)), 5, 4, [2, 3, 4, 5, 6], 2),
        "stage6": (list(range(304, 449, 16)), 7, 4, [1, 2], 1),
    }
    for stage in searchable:
        widths, window, n_windows, depths, stride = expected[stage.name]
        assert list(stage.widths) == widths, stage.name
        assert stage.window == window, stage.name
        assert len(stage.windows) == n_windows, stage.name
        assert list(stage.depths) == depths, stage.name
        assert stage.stride == stride, stage.name
        # a window is W consecutive widths
        for i, win in enumerate(stage.windows):
            assert list(win) == widths[i : i + window]
        assert set(stage.block_types) == set(SIX_BLOCK_TYPES.values())
    assert len(hyperspace("onnxw").stages[-1].widths) == 10  # stage6: 10 widths, W7 -> 4 windows
    # fixed stem and stage0 before the searchable stages
    stem, stage0 = h.stages[0], h.stages[1]
    assert not stem.searchable and stem.fixed_block.name == "conv" and stem.stride == 2
    assert list(stem.widths) == [16, 32]
    assert not stage0.searchable and stage0.fixed_block.name == "resnet"
    assert list(stage0.widths) == [16, 32] and list(stage0.depths) == [1, 2]
    assert list(h.resolutions) == [160, 176, 192, 208, 224]
    assert h.head.widths == (1280, 1920) and h.head.activation == "hswish"


def test_onnxw_block_types_match_design():
    h = hyperspace("onnxw")
    by_digit = h.block_type_by_digit
    assert {d: b.name for d, b in by_digit.items()} == SIX_BLOCK_TYPES
    assert by_digit[0].kernels == (3, 5) and by_digit[0].expand_ratios == (0.0,)
    assert by_digit[1].expand_ratios == (4.0, 6.0, 8.0) and by_digit[1].variant.activation == "relu6"
    assert by_digit[2].variant.se and by_digit[2].variant.activation == "hswish"
    assert by_digit[3].kernels == (3, 5, 7) and by_digit[3].expand_ratios == (0.5, 1.0, 1.5)
    assert by_digit[4].variant.se and not by_digit[3].variant.se
    assert by_digit[5].expand_ratios == (1.0, 2.0, 3.0, 4.0) and by_digit[5].variant.activation == "swish"
    assert by_digit[3].variant.expand_of == "output" and by_digit[1].variant.expand_of == "input"
    assert by_digit[0].variant.expand_of == "none"


def test_tiny_hyperspace():
    h = hyperspace("tiny")
    assert len(h.searchable_stages) == 4
    assert {d: b.name for d, b in h.block_type_by_digit.items()} == SIX_BLOCK_TYPES
    for stage in h.searchable_stages:
        assert len(stage.windows) >= 2, stage.name
        assert set(stage.block_types) == set(SIX_BLOCK_TYPES.values())
    assert len(h.resolutions) >= 2
    assert h.in_channels == 1 and h.num_classes == 10
    cs = h.candidate_space("tiny-1111-0000")
    assert cs.block_digits == (1, 1, 1, 1) and cs.window_digits == (0, 0, 0, 0)
    assert all(s.block_type.name == "mbv2" for s in cs.stages if s.searchable)
    assert [s.widths for s in cs.stages if s.searchable] == [(16, 24), (32, 48), (64, 80), (96, 112)]
    assert cs.encoding == str(cs) == "tiny-1111-0000"


def test_tiny_enumerates_every_candidate_space_once():
    h = hyperspace("tiny")
    encodings = [cs.encoding for cs in h.all_candidate_spaces()]
    expected = 1
    for stage in h.searchable_stages:
        expected *= len(stage.block_types) * len(stage.windows)
    assert len(encodings) == expected == 6**4 * 2**4
    assert len(set(encodings)) == len(encodings)
    assert [cs.encoding for cs in h.homogeneous_spaces()] == [f"tiny-{d * 4}-0000" for d in "012345"]


def test_mobilenetv3_has_a_single_candidate_space():
    h = hyperspace("mobilenetv3")
    spaces = list(h.all_candidate_spaces())
    assert [cs.encoding for cs in spaces] == ["mobilenetv3-22222-00000"]
    assert [cs.encoding for cs in h.homogeneous_spaces()] == ["mobilenetv3-22222-00000"]
    cs = h.candidate_space("mobilenetv3-22222-00000")
    assert all(s.block_type.name == "mbv3_se" for s in cs.stages[1:])
    assert h.random_candidate_space(random.Random(0)) == cs


# ---------------------------------------------------------------------------------------------
# Published encodings


def test_published_space_and_seqnet_a0_hard_coded():
    """The published spaceevo@vnni space and SEQnet@vnni-A0 from DESIGN.md."""
    cs = published_space()
    assert cs.encoding == PUBLISHED_SPACE
    names = [s.block_type.name for s in cs.stages if s.searchable]
    assert names == ["mbv2", "fused_mbconv", "mbv2", "mbv2", "mbv3_se", "mbv3_se"]
    widths = [s.widths for s in cs.stages if s.searchable]
    assert widths == [
        (32, 48),
        (64, 80),
        (112, 128, 144),
        (144, 160, 176),
        (240, 256, 272, 288, 304),
        (320, 336, 352, 368, 384, 400, 416),
    ]
    subnet = cs.subnet(SEQNET_VNNI_A0)
    assert subnet.encode() == SEQNET_VNNI_A0
    assert str(subnet) == SEQNET_VNNI_A0
    assert subnet.depths == (1, 1, 2, 2, 2, 2, 2, 1)
    assert subnet.resolution == 160
    assert S.parse_subnet(SEQNET_VNNI_A0) == subnet


def test_published_seqnet_a0_resolves():
    cs = published_space()
    arch = cs.resolve(cs.subnet(SEQNET_VNNI_A0))
    blocks = arch.blocks
    assert len(blocks) == 13
    # Stage order: stem conv, stage0 resnet, stage1 mbv2, stage2 fused, stage3/4 mbv2, stage5/6 mbv3_se.
    expected_types = ["conv", "resnet", "mbv2", "mbv2", "fused_mbconv", "fused_mbconv",
                      "mbv2", "mbv2", "mbv2", "mbv2", "mbv3_se", "mbv3_se", "mbv3_se"]
    assert [b.block_type for b in blocks] == expected_types
    assert [b.in_channels for b in blocks] == [3, 16, 16, 32, 32, 64, 64, 112, 112, 144, 144, 240, 240]
    assert [b.out_channels for b in blocks] == [16, 16, 32, 32, 64, 64, 112, 112, 144, 144, 240, 240, 320]
    assert [b.stride for b in blocks] == [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 2, 1, 1]
    assert [b.input_size for b in blocks] == [160, 80, 80, 40, 40, 20, 20, 10, 10, 10, 10, 5, 5]
    assert arch.final_size == 5 and arch.final_channels == 320
    assert arch.resolution == 160 and arch.in_channels == 3 and arch.num_classes == 1000
    assert [b.shortcut for b in blocks] == [
        "none", "identity", "none", "identity", "none", "identity",
        "none", "identity", "none", "identity", "none", "identity", "none",
    ]
    assert [b.variant.se for b in blocks] == [False] * 10 + [True] * 3
    assert [b.variant.activation for b in blocks][:3] == ["relu", "relu", "relu6"]
    # mbv2 / fused / mbv3 expand their input (16*4, 32*4, 32*1, ...), resnet its output (16*0.5),
    # the stem conv not at all
    assert [b.mid_channels for b in blocks] == [0, 8, 64, 128, 32, 64, 256, 448, 448, 576, 576, 960, 960]


def _published_vnni_subnets() -> dict[str, str]:
    data = yaml.safe_load(PUBLISHED_YAML.read_text())
    assert data["spaces"]["spaceevo@vnni"] == PUBLISHED_SPACE
    subnets = {
        name: entry["subnet"]
        for name, entry in data["subnets"].items()
        if entry["space"] == "spaceevo@vnni"
    }
    assert sorted(subnets) == [f"SEQnet@vnni-A{i}" for i in range(5)]
    return subnets


def test_published_vnni_subnets_round_trip():
    subnets = _published_vnni_subnets()
    assert subnets["SEQnet@vnni-A0"] == SEQNET_VNNI_A0
    cs = published_space()
    for name, text in subnets.items():
        subnet = cs.subnet(text)
        assert subnet.encode() == text, name
        arch = cs.resolve(subnet)
        assert len(arch.blocks) == sum(subnet.depths), name
        assert arch.resolution in (160, 192, 208, 224), name


def test_published_vnni_space_string_from_reference():
    data = yaml.safe_load(PUBLISHED_YAML.read_text())
    for key in ("spaceevo@vnni", "spaceevo@vnni-large"):
        encoding = data["spaces"][key]
        cs = S.load_space(encoding)
        assert isinstance(cs, S.CandidateSpace)
        assert cs.encoding == encoding


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", ["onnxw", "tiny", "mobilenetv3", "mobilew"])
def test_random_round_trips(name):
    h = hyperspace(name)
    for seed in range(60):
        rng = random.Random(seed)
        cs = h.random_candidate_space(rng)
        text = cs.encoding
        assert re.fullmatch(rf"{name}-\d+-\d+", text)
        parsed = h.candidate_space(text)
        assert parsed == cs
        assert parsed.encoding == text
        assert S.CandidateSpace.parse(text, h) == cs
        for _ in range(4):
            subnet = cs.random_subnet(rng)
            encoded = subnet.encode()
            assert cs.subnet(encoded) == subnet
            assert S.parse_subnet(encoded) == subnet
            assert cs.subnet(encoded).encode() == encoded
            cs.check_subnet(subnet)  # a random subnet always fits its space


def test_random_candidate_spaces_are_deterministic_and_varied():
    h = hyperspace("onnxw")
    a = [h.random_candidate_space(random.Random(s)).encoding for s in range(30)]
    b = [h.random_candidate_space(random.Random(s)).encoding for s in range(30)]
    assert a == b
    assert len(set(a)) > 20
    cs = published_space()
    subs = {cs.random_subnet(random.Random(s)).encode() for s in range(30)}
    assert len(subs) == 30


def test_load_space_round_trip_of_encoding():
    rng = random.Random(7)
    for _ in range(10):
        cs = hyperspace("onnxw").random_candidate_space(rng)
        loaded = S.load_space(cs.encoding)
        assert isinstance(loaded, S.CandidateSpace)
        assert loaded.encoding == cs.encoding
        assert loaded.block_digits == cs.block_digits and loaded.window_digits == cs.window_digits


@pytest.mark.parametrize("encoding", [PUBLISHED_SPACE, "tiny-1111-0000", "tiny-5031-1010", "mobilenetv3-22222-00000"])
def test_max_and_min_subnets(encoding):
    cs = S.load_space(encoding)
    h = cs.hyperspace
    big, small = cs.subnet("max"), cs.subnet("min")
    assert big == cs.max_subnet() and small == cs.min_subnet()
    assert cs.subnet(" max ") == big
    assert big.resolution == max(h.resolutions) and small.resolution == min(h.resolutions)
    for stage, blocks in zip(cs.stages, big.stages):
        assert len(blocks) == max(stage.depths)
        assert all(b == S.BlockChoice(max(stage.kernels), max(stage.widths), max(stage.expand_ratios)) for b in blocks)
    for stage, blocks in zip(cs.stages, small.stages):
        assert len(blocks) == min(stage.depths)
        assert all(b == S.BlockChoice(min(stage.kernels), min(stage.widths), min(stage.expand_ratios)) for b in blocks)
    for subnet in (big, small):
        assert cs.subnet(subnet.encode()) == subnet
    assert cs.max_subnet(resolution=h.resolutions[0]).resolution == h.resolutions[0]
    assert sum(big.depths) >= sum(small.depths)


def test_tiny_max_min_strings():
    cs = tiny_space()
    assert cs.subnet("min").encode() == "d1#1#1#1#1_k3#3#3#3#3_w16#16#32#64#96_e0#3.0#3.0#3.0#3.0_r24"
    assert cs.subnet("max").encode() == (
        "d1#2#3#3#2_k3#5#5#5#5#5#5#5#5#5#5_w16#24#24#48#48#48#80#80#80#112#112"
        "_e0#6.0#6.0#6.0#6.0#6.0#6.0#6.0#6.0#6.0#6.0_r32"
    )


def test_format_number_and_make_divisible():
    assert S.format_number(0) == "0"
    assert S.format_number(0.0) == "0"
    assert S.format_number(4) == "4.0"
    assert S.format_number(0.5) == "0.5"
    assert S.format_number(1.5) == "1.5"
    assert make_divisible(8) == 8
    assert make_divisible(3) == 8
    assert make_divisible(12) == 16
    assert make_divisible(20) == 24
    assert make_divisible(64) == 64
    assert make_divisible(100) == 104
    for v in range(1, 400):
        r = make_divisible(v)
        assert r % 8 == 0 and r >= 0.9 * v


# ---------------------------------------------------------------------------------------------
# resolve()


def _expected_shortcut(spec: BlockSpec, position: int) -> str:
    if spec.block_type == "conv":
        return "none"
    if position == 0 and not spec.block_type.startswith("resnet"):
        return "none"
    if spec.stride == 1 and spec.in_channels == spec.out_channels:
        return "identity"
    return "projection"


@pytest.mark.parametrize("name", ["onnxw", "tiny"])
def test_resolve_invariants_on_random_subnets(name):
    h = hyperspace(name)
    rng = random.Random(123)
    seen_shortcuts = set()
    for _ in range(40):
        cs = h.random_candidate_space(rng)
        for _ in range(3):
            subnet = cs.random_subnet(rng)
            arch = cs.resolve(subnet)
            assert arch.subnet == subnet and arch.space == cs
            assert len(arch.stages) == len(cs.stages)
            in_channels, size = h.in_channels, subnet.resolution
            for stage, choices, specs in zip(cs.stages, subnet.stages, arch.stages):
                assert len(specs) == len(choices)
                for position, (choice, spec) in enumerate(zip(choices, specs)):
                    assert spec.in_channels == in_channels
                    assert spec.out_channels == choice.width
                    assert spec.kernel == choice.kernel and spec.expand == choice.expand
                    assert spec.stride == (stage.stride if position == 0 else 1)
                    assert spec.input_size == size
                    assert spec.output_size == (size - 1) // spec.stride + 1
                    assert spec.block_type == stage.block_type.name
                    assert spec.variant == stage.block_type.variant
                    assert spec.shortcut == _expected_shortcut(spec, position)
                    seen_shortcuts.add(spec.shortcut)
                    if spec.variant.expand_of == "input":
                        assert spec.mid_channels == make_divisible(spec.in_channels * spec.expand)
                    elif spec.variant.expand_of == "output":
                        assert spec.mid_channels == make_divisible(spec.out_channels * spec.expand)
                    else:
                        assert spec.mid_channels == 0
                    in_channels, size = spec.out_channels, spec.output_size
            assert arch.final_channels == in_channels and arch.final_size == size
            assert len(arch.blocks) == sum(subnet.depths)
    assert seen_shortcuts == {"none", "identity", "projection"}


def test_resolve_shortcut_rules_explicit():
    h = hyperspace("tiny")
    # resnet everywhere (digit 3): the first block of a strided stage gets a projection
    cs = h.candidate_space("tiny-3333-0000")
    arch = cs.resolve(cs.subnet("d1#2#1#2#1_k3#3#3#3#3#3#3_w16#16#24#32#64#80#96_e0#0.5#0.5#0.5#1.0#1.0#0.5_r28"))
    stem, s1, s2, s3, s4 = arch.stages
    assert stem[0].shortcut == "none" and stem[0].stride == 1
    # stage1: stride 2, 16 -> 16: projection (stride); second block 16 -> 24: projection (width)
    assert [b.shortcut for b in s1] == ["projection", "projection"]
    assert [b.stride for b in s1] == [2, 1]
    # stage3 (stride 1): 32 -> 64 projection, then 64 -> 80 projection
    assert [b.shortcut for b in s3] == ["projection", "projection"]
    # resnet expands its output: 0.5 * 16 = 8, 1.0 * 64 = 64
    assert s1[0].mid_channels == 8 and s3[0].mid_channels == 64
    assert s1[1].mid_channels == make_divisible(24 * 0.5) == 16

    # resnet in a stride-1 stage (stage3): projection when the width changes (32 -> 64) ...
    arch = cs.resolve(cs.subnet("d1#1#1#1#1_k3#3#3#3#3_w16#16#32#64#96_e0#0.5#0.5#0.5#0.5_r24"))
    assert arch.stages[3][0].stride == 1
    assert arch.stages[3][0].in_channels == 32 and arch.stages[3][0].shortcut == "projection"
    # ... and identity, even on its first block, when the width stays (64 -> 64, window [48, 64] before)
    text = "d1#1#1#1#1_k3#3#3#3#3_w16#16#64#64#96_e0#0.5#0.5#0.5#0.5_r24"
    arch = hyperspace("tiny").candidate_space("tiny-3333-0100").resolve(S.parse_subnet(text))
    first = arch.stages[3][0]
    assert (first.in_channels, first.out_channels, first.stride, first.shortcut) == (64, 64, 1, "identity")
    # the same shapes with an inverted-residual block: no shortcut on the first block of a stage
    arch = hyperspace("tiny").candidate_space("tiny-1111-0100").resolve(
        S.parse_subnet(text.replace("e0#0.5#0.5#0.5#0.5", "e0#3.0#3.0#3.0#3.0"))
    )
    first = arch.stages[3][0]
    assert (first.in_channels, first.out_channels, first.stride, first.shortcut) == (64, 64, 1, "none")

    # mbv2 (digit 1): first block of every stage has no shortcut, later ones identity/projection
    cs = h.candidate_space("tiny-1111-0000")
    arch = cs.resolve(cs.subnet("d1#2#3#1#1_k3#3#5#3#5#3#3#3_w16#16#24#32#32#48#64#96_e0#3.0#6.0#3.0#6.0#3.0#3.0#3.0_r32"))
    s1, s2 = arch.stages[1], arch.stages[2]
    assert [b.shortcut for b in s1] == ["none", "projection"]
    assert [b.shortcut for b in s2] == ["none", "identity", "projection"]
    # mbv2 expands its input: 16 * 3 = 48, 16 * 6 = 96, 32 * 6 = 192
    assert s1[0].mid_channels == 48 and s1[1].mid_channels == 96 and s2[1].mid_channels == 192
    assert [b.input_size for b in s1] == [32, 16] and [b.input_size for b in s2] == [16, 8, 8]
    # mbv1_dual (digit 0) has no expansion at all
    cs = h.candidate_space("tiny-0000-0000")
    arch = cs.resolve(cs.subnet("d1#2#1#1#1_k3#5#5#3#3#3_w16#16#16#32#64#96_e0#0#0#0#0#0_r28"))
    assert arch.stages[1][0].shortcut == "none" and arch.stages[1][1].shortcut == "identity"
    assert all(b.mid_channels == 0 for b in arch.blocks)
    assert arch.stages[1][0].key == "mbv1_dual:i16:o16:k5:e0:s2:h28:none"


def test_resolve_rejects_a_subnet_that_does_not_fit():
    cs = tiny_space()
    bad = S.parse_subnet(TINY_OK.replace("_r28", "_r30"))
    with pytest.raises(EncodingError, match="field r"):
        cs.resolve(bad)


# ---------------------------------------------------------------------------------------------
# Subnet rejections


def _encoding_error(cs: S.CandidateSpace, text: str) -> str:
    with pytest.raises(EncodingError) as info:
        cs.subnet(text)
    assert info.value.exit_code == 2
    return str(info.value)


def test_tiny_ok_subnet_parses():
    assert tiny_space().subnet(TINY_OK).encode() == TINY_OK


def test_reject_wrong_number_of_depths():
    message = _encoding_error(tiny_space(), "d1#1#1#1_k3#3#3#3_w16#16#32#64_e0#3.0#3.0#3.0_r28")
    assert "field d" in message
    assert "4 depths" in message and "5 stages" in message
    assert "stem, stage1, stage2, stage3, stage4" in message


def test_reject_depth_not_allowed():
    text = "d1#3#1#1#1_k3#3#3#3#3#3#3_w16#16#16#16#32#64#96_e0#3.0#3.0#3.0#3.0#3.0#3.0_r28"
    message = _encoding_error(tiny_space(), text)
    assert "depth 3" in message and "stage1" in message and "field d" in message
    assert "allowed: [1, 2]" in message


def test_reject_width_outside_window():
    # stage4 of tiny-1111-0000 has the window [96, 112]; 128 is a width of the hyperspace but not of the window
    text = TINY_OK.replace("w16#16#32#64#96", "w16#16#32#64#128")
    message = _encoding_error(tiny_space(), text)
    assert "w128" in message and "field w" in message and "stage4" in message
    assert "allowed: [96, 112]" in message


def test_reject_width_outside_window_published_space():
    text = SEQNET_VNNI_A0.replace("w16#16#32#32#", "w16#16#32#64#")
    message = _encoding_error(published_space(), text)
    assert "w64" in message and "field w" in message and "stage1" in message
    assert "[32, 48]" in message


def test_reject_kernel_not_allowed():
    message = _encoding_error(tiny_space(), TINY_OK.replace("k3#3#3#3#3", "k3#7#3#3#3"))
    assert "k7" in message and "field k" in message and "stage1" in message
    assert "allowed: [3, 5]" in message


def test_reject_kernel_of_fixed_stage():
    message = _encoding_error(tiny_space(), TINY_OK.replace("k3#3#3#3#3", "k5#3#3#3#3"))
    assert "k5" in message and "stem" in message and "allowed: [3]" in message


def test_reject_expand_not_allowed():
    message = _encoding_error(tiny_space(), TINY_OK.replace("e0#3.0#3.0", "e0#3.0#4.0"))
    assert "e4.0" in message and "field e" in message and "stage2" in message
    assert "3.0" in message and "6.0" in message and "allowed" in message


def test_reject_expand_for_block_without_expansion():
    cs = hyperspace("tiny").candidate_space("tiny-0000-0000")
    message = _encoding_error(cs, "d1#1#1#1#1_k3#3#3#3#3_w16#16#32#64#96_e0#4.0#0#0#0_r28")
    assert "e4.0" in message and "field e" in message and "mbv1_dual" in message
    assert "allowed: ['0']" in message or "allowed: [0]" in message


def test_reject_resolution_not_allowed():
    message = _encoding_error(tiny_space(), TINY_OK.replace("_r28", "_r30"))
    assert "r30" in message and "field r" in message
    assert "[24, 28, 32]" in message


@pytest.mark.parametrize(
    "text, fragments",
    [
        (TINY_OK.replace("_r28", ""), ["lacks field", "r"]),
        (TINY_OK.replace("_k3#3#3#3#3", ""), ["lacks field", "k"]),
        (TINY_OK.replace("k3#3#3#3#3", "k3#3#3#x#3"), ["field k", "int", "3#3#3#x#3"]),
        (TINY_OK.replace("d1#1#1#1#1", "d1#1#one#1#1"), ["field d", "int"]),
        (TINY_OK.replace("e0#3.0", "e0#three"), ["field e", "float"]),
        (TINY_OK.replace("_r28", "_rX"), ["field r", "integer", "'X'"]),
        (TINY_OK.replace("k3#3#3#3#3", "k3#3#3#3"), ["field k", "4 values", "5 blocks"]),
        (TINY_OK.replace("w16#16#32#64#96", "w16#16#32#64#96#96"), ["field w", "6 values", "5 blocks"]),
        (TINY_OK + "_d1", ["malformed", "d, k, w, e, r"]),
        (TINY_OK.replace("_r28", "_x28"), ["malformed", "x28", "d, k, w, e, r"]),
        ("garbage", ["malformed", "garbage"]),
        ("", ["malformed", "d, k, w, e, r"]),
    ],
)
def test_reject_malformed_subnet_strings(text, fragments):
    message = _encoding_error(tiny_space(), text)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    with pytest.raises(EncodingError):
        S.parse_subnet(text)


# ---------------------------------------------------------------------------------------------
# Candidate-space rejections


def _space_error(h: S.Hyperspace, text: str) -> str:
    with pytest.raises(EncodingError) as info:
        h.candidate_space(text)
    assert info.value.exit_code == 2
    return str(info.value)


def test_reject_bad_block_digit():
    message = _space_error(hyperspace("onnxw"), "onnxw-751122-023231")
    assert "block type digit 7" in message and "stage1" in message
    assert "0=mbv1_dual, 1=mbv2, 2=mbv3_se, 3=resnet, 4=resnet_se, 5=fused_mbconv" in message


def test_reject_block_digit_not_offered_by_mobilenetv3():
    message = _space_error(hyperspace("mobilenetv3"), "mobilenetv3-21222-00000")
    assert "block type digit 1" in message and "stage2" in message
    assert "2=mbv3_se" in message


def test_reject_window_digit_out_of_range():
    message = _space_error(hyperspace("onnxw"), "onnxw-151122-223231")
    assert "window digit 2" in message and "stage1" in message
    assert "0..1" in message and "[32, 48], [48, 64]" in message
    message = _space_error(hyperspace("onnxw"), "onnxw-151122-023234")
    assert "window digit 4" in message and "stage6" in message and "0..3" in message


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("onnxw-15112-023231", ["6 block digits", "6 window digits", "got 5 and 6"]),
        ("onnxw-151122-0232311", ["6 window digits", "got 6 and 7"]),
        ("onnxw-1511x2-023231", ["'onnxw-1511x2-023231'", "must be digits, 6 each", "'onnxw-000000-000000'"]),
        ("onnxw-151122", ["not a candidate space of 'onnxw'", "onnxw-<block digits>-<window digits>"]),
        ("onnxw--", ["must be digits"]),
        ("onnxw-15112-023231", ["'onnxw-15112-023231'", "stage1, stage2, stage3, stage4, stage5, stage6"]),
        ("onnxw-751122-023231", ["'onnxw-751122-023231'", "block type digit 7"]),
        ("onnxw-151122-223231", ["'onnxw-151122-223231'", "window digit 2"]),
    ],
)
def test_reject_malformed_candidate_space(text, fragments):
    message = _space_error(hyperspace("onnxw"), text)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_reject_wrong_hyperspace_name():
    message = _space_error(hyperspace("onnxw"), "tiny-151122-023231")
    assert "'tiny-151122-023231'" in message and "not a candidate space of 'onnxw'" in message
    assert "onnxw-<block digits>-<window digits>" in message
    message = _space_error(hyperspace("tiny"), PUBLISHED_SPACE)
    assert "not a candidate space of 'tiny'" in message


def test_direct_construction_is_validated():
    with pytest.raises(EncodingError, match="4 block digits"):
        S.CandidateSpace(hyperspace("tiny"), (1, 1, 1), (0, 0, 0, 0))
    with pytest.raises(EncodingError, match="window digit 2"):
        S.CandidateSpace(hyperspace("tiny"), (1, 1, 1, 1), (0, 2, 0, 0))


def test_a_missing_depth_is_blamed_on_field_d_not_k():
    text = "d1#1#1#1_k3#3#3#3#3_w16#16#32#64#96_e0#3.0#3.0#3.0#3.0_r28"  # four depths, five blocks
    message = _encoding_error(tiny_space(), text)
    assert "field d" in message and "4 depths" in message and "5 stages" in message
    assert "field k" not in message


def test_depths_that_add_up_wrong_are_blamed_on_field_d():
    text = "d1#1#1#1#2_k3#3#3#3#3_w16#16#32#64#96_e0#3.0#3.0#3.0#3.0_r28"  # k, w, e agree on five blocks
    for message in (_encoding_error(tiny_space(), text), _parse_error(text)):
        assert message.startswith("field d") and "adds up to 6 blocks" in message
        assert "5 values each" in message and "must add up to 5" in message


def test_depth_zero_is_rejected():
    message = _parse_error("d1#0_k3_w16_e0_r28")
    assert "field d" in message and "depth 0" in message and "at least 1" in message


def _parse_error(text: str) -> str:
    with pytest.raises(EncodingError) as info:
        S.parse_subnet(text)
    return str(info.value)


def test_subnet_of_other_space_is_rejected():
    # a published onnxw subnet does not fit a tiny candidate space
    message = _encoding_error(tiny_space(), SEQNET_VNNI_A0)
    assert "field d" in message and "8 depths" in message


# ---------------------------------------------------------------------------------------------
# Malformed hyperspace YAML files


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


def _config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        S.load_hyperspace(path)
    message = str(info.value)
    assert str(path) in message, message
    assert info.value.exit_code == 2
    return message


def _tiny_with(old: str, new: str, count: int = 1) -> str:
    base = TINY_YAML.read_text()
    assert old in base, old
    return base.replace(old, new, count)


def test_tiny_copy_loads_from_path(tmp_path):
    path = _write(tmp_path, TINY_YAML.read_text())
    h = S.load_hyperspace(path)
    assert h.name == "tiny" and h.source == str(path)
    assert h.digest == hyperspace("tiny").digest


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    text = "name: x\ninput:\n  channels: 1\nstages: [a, b\nhead: {}\n"
    message = _config_error(_write(tmp_path, text))
    assert "malformed YAML" in message
    assert "line 5" in message


def test_yaml_syntax_error_in_shipped_file_copy(tmp_path):
    text = "name: tiny\ninput:\n  channels: 1\n  resolutions: [28]\n bad: 1\n"
    message = _config_error(_write(tmp_path, text))
    assert re.search(r"line \d+", message)
    assert "line 5" in message


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_yaml_not_a_mapping(tmp_path, text):
    message = _config_error(_write(tmp_path, text))
    assert "mapping" in message


def test_unknown_block_type_under_block_types(tmp_path):
    text = _tiny_with("  mbv1_dual:    {digit: 0", "  mbv9:    {digit: 0")
    message = _config_error(_write(tmp_path, text))
    assert "mbv9" in message and f"line {_line_of(text, 'mbv9')}" in message
    assert "block_types.mbv9" in message
    for allowed in ("mbv1_dual", "mbv2", "mbv3_se", "resnet", "resnet_se", "fused_mbconv"):
        assert allowed in message


def test_stage_uses_undeclared_block_type(tmp_path):
    text = _tiny_with("  mbv1_dual:    {digit: 0, kernels: [3, 5]}\n", "")
    message = _config_error(_write(tmp_path, text))
    assert "'mbv1_dual'" in message and "stages.1.block_types" in message
    assert "declared under block_types" in message
    assert "mbv2, mbv3_se, resnet, resnet_se, fused_mbconv" in message
    assert f"line {_line_of(text, 'block_types: [mbv1_dual')}" in message


def test_unknown_key_names_key_path_and_line(tmp_path):
    text = _tiny_with("    widths: [16, 24, 32]", "    widht: [16, 24, 32]")
    message = _config_error(_write(tmp_path, text))
    assert "stages.1.widht" in message
    assert f"line {_line_of(text, 'widht')}" in message
    assert "unknown key" in message and "widths" in message


def test_unknown_top_level_key(tmp_path):
    text = TINY_YAML.read_text() + "extra: 1\n"
    message = _config_error(_write(tmp_path, text))
    assert "'extra'" in message and f"line {_line_of(text, 'extra:')}" in message
    assert "name, description, input" in message


def test_wrong_type_stride_two(tmp_path):
    text = _tiny_with("    stride: 2\n", "    stride: two\n")
    message = _config_error(_write(tmp_path, text))
    assert "stages.1.stride" in message and "expected int" in message and "'two'" in message
    assert f"line {_line_of(text, 'stride: two')}" in message


def test_stride_three_lists_allowed_values(tmp_path):
    text = _tiny_with("    stride: 2\n", "    stride: 3\n")
    message = _config_error(_write(tmp_path, text))
    assert "stages.1.stride" in message and "3 is not allowed" in message
    assert "allowed: 1, 2" in message
    assert f"line {_line_of(text, 'stride: 3')}" in message


@pytest.mark.parametrize(
    "old, new, fragments",
    [
        ("    widths: [16, 24, 32]", "    widths: 16", ["stages.1.widths", "expected list"]),
        ("mbv2:         {digit: 1, kernels: [3, 5]", "mbv2:         {digit: 1, kernels: [3, five]",
         ["block_types.mbv2.kernels", "'five'"]),
        ("mbv2:         {digit: 1, kernels: [3, 5]", "mbv2:         {digit: 1, kernels: [3, 4]",
         ["block_types.mbv2.kernels", "odd"]),
        ("mbv2:         {digit: 1", "mbv2:         {digit: 0", ["block_types.mbv2.digit", "unique", "mbv1_dual"]),
        ("mbv1_dual:    {digit: 0, kernels: [3, 5]}", "mbv1_dual:    {digit: 0, kernels: [3, 5], expand_ratios: [2]}",
         ["block_types.mbv1_dual.expand_ratios", "allowed: [0]"]),
        ("    window: 2\n", "    window: 4\n", ["stages.1.window", "between 1 and", "(3)"]),
        ("    widths: [16, 24, 32]", "    widths: [16, 32, 24]", ["stages.1.widths", "increasing"]),
        ("    depths: [1, 2]\n", "    depths: [0, 2]\n", ["stages.1.depths", "at least 1"]),
        ("  widths: [256, 512]", "  widths: [256]", ["head.widths", "two widths"]),
        ("  activation: hswish", "  activation: gelu", ["head.activation", "'gelu'", "relu, relu6, hswish, swish, none"]),
        ("block: conv", "block: convv", ["stages.0.block", "'convv'", "allowed: conv, mbv1_dual"]),
        ("name: tiny", "name: ti-ny", ["'name'", "'-'"]),
        ("num_classes: 10\n", "", ["missing key 'num_classes'"]),
    ],
)
def test_other_validation_errors(tmp_path, old, new, fragments):
    text = _tiny_with(old, new)
    message = _config_error(_write(tmp_path, text))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    "old, new, key, value, allowed",
    [
        ("    widths: [16, 24, 32]", "    widths: [0, 24, 32]", "stages.1.widths", "0", "integers at least 1"),
        ("num_classes: 10", "num_classes: 0", "num_classes", "0", "an integer at least 2"),
        ("num_classes: 10", "num_classes: 1", "num_classes", "1", "an integer at least 2"),
        ("  channels: 1", "  channels: 0", "input.channels", "0", "integers at least 1"),
        ("  resolutions: [24, 28, 32]", "  resolutions: [0, 28, 32]", "input.resolutions", "0", "integers at least 1"),
        ("  resolutions: [24, 28, 32]", "  resolutions: [-24, 28]", "input.resolutions", "-24", "integers at least 1"),
        ("mbv2:         {digit: 1, kernels: [3, 5]", "mbv2:         {digit: 1, kernels: [-3, 5]",
         "block_types.mbv2.kernels", "-3", "odd integers at least 1"),
        ("mbv2:         {digit: 1, kernels: [3, 5]", "mbv2:         {digit: 1, kernels: [0, 5]",
         "block_types.mbv2.kernels", "0", "odd integers at least 1"),
        ("expand_ratios: [3, 6]}", "expand_ratios: [0, 6]}", "block_types.mbv2.expand_ratios", "0.0",
         "numbers greater than 0"),
        ("expand_ratios: [3, 6]}", "expand_ratios: [.nan, 6]}", "block_types.mbv2.expand_ratios", "nan",
         "finite numbers"),
        ("expand_ratios: [3, 6]}", "expand_ratios: [.inf, 6]}", "block_types.mbv2.expand_ratios", "inf",
         "finite numbers"),
        ("    depths: [1, 2]\n", "    depths: [-1, 2]\n", "stages.1.depths", "-1", "integers at least 1"),
        ("stride: 1, kernels: [3]}", "stride: 1, kernels: [4]}", "stages.0.kernels", "4", "odd integers at least 1"),
        ("    stride: 2\n", "    stride: 2\n    kernels: [2]\n", "stages.1.kernels", "2", "odd integers at least 1"),
        ("    stride: 2\n", "    stride: 2\n    expand_ratios: [0]\n", "stages.1.expand_ratios", "'mbv2'",
         "numbers greater than 0"),
        ("  widths: [256, 512]", "  widths: [256, 0]", "head.widths", "0", "integers at least 1"),
        ("    window: 2\n", "    window: 0\n", "stages.1.window", "0", "between 1 and"),
        ("    stride: 2\n", "    stride: 0\n", "stages.1.stride", "0", "allowed: 1, 2"),
    ],
)
def test_every_numeric_field_is_validated(tmp_path, old, new, key, value, allowed):
    """Values that used to pass validation and fail later, inside a latency or training worker."""
    text = _tiny_with(old, new)
    message = _config_error(_write(tmp_path, text))
    changed = next(line for line in new.splitlines() if line.strip() and line not in old.splitlines())
    assert f"line {_line_of(text, changed.strip())}" in message, message
    for fragment in (f"key '{key}'", value, allowed):
        assert fragment in message, (fragment, message)


def test_stage_expand_ratios_must_fit_every_block_type_of_the_stage(tmp_path):
    text = _tiny_with("    stride: 2\n", "    stride: 2\n    expand_ratios: [2]\n")
    message = _config_error(_write(tmp_path, text))
    assert "stages.1.expand_ratios" in message and "'mbv1_dual'" in message and "allowed: [0]" in message


def test_fixed_stage_with_expansion_needs_positive_ratios(tmp_path):
    text = (S.SEARCH_SPACES_DIR / "onnxw.yaml").read_text().replace("expand_ratios: [0.5]}", "expand_ratios: [0]}")
    message = _config_error(_write(tmp_path, text))
    assert "stages.1.expand_ratios" in message and "'resnet'" in message and "greater than 0" in message


def test_hyperspace_without_searchable_stage(tmp_path):
    text = (
        "name: x\ninput: {channels: 1, resolutions: [28]}\nnum_classes: 10\nblock_types: {}\n"
        "stages:\n  - {name: stem, block: conv, widths: [16], depths: [1], stride: 1, kernels: [3]}\n"
        "head: {widths: [8, 16]}\n"
    )
    message = _config_error(_write(tmp_path, text))
    assert "searchable stage" in message and "'stages'" in message


def test_missing_yaml_path():
    with pytest.raises(ConfigError, match="no such hyperspace file"):
        S.load_hyperspace("/nonexistent/dir/space.yaml")


def test_unknown_hyperspace_name_lists_available():
    with pytest.raises(UsageError) as info:
        S.load_hyperspace("nosuchspace")
    assert not isinstance(info.value, ConfigError)  # a name, not a file
    message = str(info.value)
    assert "nosuchspace" in message
    for name in S.available_hyperspaces():
        assert name in message
    assert info.value.exit_code == 2
    with pytest.raises(UsageError, match="available: mobilenetv3, mobilew, onnxw, tiny"):
        S.load_space("nosuchspace-11-00")


def test_error_classes_exit_codes():
    assert ConfigError.exit_code == 2 and EncodingError.exit_code == 2 and UsageError.exit_code == 2
    assert issubclass(ConfigError, UsageError) and issubclass(EncodingError, UsageError)
    assert issubclass(UsageError, SpaceEvoError)
    assert ConfigError("x").exit_code == 2 and EncodingError("x").exit_code == 2


# ---------------------------------------------------------------------------------------------
# load_space / require_candidate_space


def test_load_space_by_name_path_and_encoding():
    by_name = S.load_space("tiny")
    assert isinstance(by_name, S.Hyperspace) and by_name.name == "tiny"
    by_path = S.load_space(str(TINY_YAML))
    assert isinstance(by_path, S.Hyperspace) and by_path.name == "tiny"
    assert by_path.digest == by_name.digest
    by_encoding = S.load_space(" tiny-1111-0000 ")
    assert isinstance(by_encoding, S.CandidateSpace)
    assert by_encoding.encoding == "tiny-1111-0000"
    assert by_encoding.hyperspace.name == "tiny"
    published = S.load_space(PUBLISHED_SPACE)
    assert isinstance(published, S.CandidateSpace) and published.encoding == PUBLISHED_SPACE
    with pytest.raises(EncodingError, match="block type digit 9"):
        S.load_space("tiny-9111-0000")


def test_require_candidate_space():
    cs = S.load_space("tiny-1111-0000")
    assert S.require_candidate_space(cs, "training") is cs
    with pytest.raises(UsageError) as info:
        S.require_candidate_space(S.load_space("tiny"), "training")
    message = str(info.value)
    assert "training" in message and "candidate space" in message and "'tiny'" in message
    assert "--space tiny-0000-0000" in message
    with pytest.raises(UsageError, match="--space onnxw-000000-011111"):
        S.require_candidate_space(hyperspace("onnxw"), "export")


def test_a_space_of_ones_own_yaml_is_named_path_colon_encoding(tmp_path) -> None:
    from test_latency import MICRO_YAML

    path = tmp_path / "micro.yaml"
    path.write_text(MICRO_YAML)
    encoding = S.load_hyperspace(path).homogeneous_spaces()[-1].encoding
    space = S.load_space(f"{path}:{encoding}")
    assert isinstance(space, S.CandidateSpace) and space.encoding == encoding and space.hyperspace.name == "micro"
    with pytest.raises(SpaceEvoError):
        S.load_space(f"{path}:micro-99")
