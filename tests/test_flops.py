"""FLOP accounting: the DESIGN §5 anchors exactly, cross-checked by torch's FlopCounterMode."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mg_lib import flops
from mg_lib.wrn import Arch, member_arch

# (depth, width, classes): MACs, FLOPs, conv + linear weights, from DESIGN §5.
ANCHORS = {
    (28, 10, 100): (5_243_386_368, 10_486_772_736, 36_518_832),
    (28, 10, 10): (5_243_328_768, 10_486_657_536, 36_461_232),
    (16, 4, 10): (392_612_352, 785_224_704, 2_745_264),
    (16, 2, 10): (101_106_944, 202_213_888, 689_840),
    (28, 1, 10): (54_968_960, 109_937_920, 367_664),
}
KINDS = ("template", "plain")


def _check_anchor(arch: Arch, key: tuple[int, int, int]) -> None:
    macs, fl, weights = ANCHORS[key]
    cost = flops.count(arch)
    assert (cost.macs, cost.flops, cost.weights) == (macs, fl, weights)
    assert flops.count_with_torch(arch) == fl


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", list(ANCHORS))
def test_plain_shaped_anchors(key: tuple[int, int, int], kind: str) -> None:
    depth, width, classes = key
    _check_anchor(Arch(kind=kind, depth=depth, width=width, members=1, classes=classes), key)


@pytest.mark.parametrize("kind", KINDS)
def test_grown_nets_match_anchors(kind: str) -> None:
    # 2 x WRN-28-5 (stem 8 each) grows to exactly a WRN-28-10; 2 x WRN-16-2 to a WRN-16-4.
    _check_anchor(Arch(kind=kind, depth=28, width=5, members=2, classes=100).as_grown(),
                  (28, 10, 100))
    _check_anchor(Arch(kind=kind, depth=16, width=2, members=2, classes=10).as_grown(),
                  (16, 4, 10))
    assert flops.phase_forward_flops(Arch(kind=kind, depth=16, width=2), "grow:wide") \
        == 785_224_704


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 4])
def test_members_cost_k_times_member(kind: str, k: int) -> None:
    arch = Arch(kind=kind, depth=16, width=2, members=k, classes=10)
    net, one = flops.count(arch), flops.count_member(arch)
    for field in ("macs", "flops", "weights", "params", "synthesis_macs"):
        assert getattr(net, field) == k * getattr(one, field), field
    assert flops.count_with_torch(arch) == net.flops
    assert flops.count_with_torch(member_arch(arch)) == one.flops


def _member_blocks(arch: Arch) -> tuple[int, int, int]:
    """Weight entries of one member's (stem, hidden convs, classifier), from the WRN paper."""
    stem = arch.stem // arch.members
    hidden, cin = 0, stem
    for g, cout in enumerate(arch.group_channels):
        for b in range(arch.blocks_per_group):
            stride = 2 if (g > 0 and b == 0) else 1
            hidden += 9 * cin * cout + 9 * cout * cout
            hidden += cin * cout if (cin != cout or stride != 1) else 0  # 1x1 projection
            cin = cout
    return 3 * 9 * stem, hidden, arch.classes * cin


@pytest.mark.parametrize("k,grown", [(1, False), (2, False), (2, True), (4, False), (4, True)])
def test_synthesis_macs_formula(k: int, grown: bool) -> None:
    arch = Arch(depth=16, width=1, members=k, templates=3, classes=10, grown=grown)
    stem, hidden, fc = _member_blocks(arch)
    # k blocks for stem and classifier; hidden convs: k blocks before growth, k^2 after.
    expected = arch.templates * (k * stem + (k * k if grown else k) * hidden + k * fc)
    cost = flops.count(arch)
    assert cost.synthesis_macs == expected
    assert flops.synthesis_flops_with_torch(arch) == 2 * expected
    assert flops.count(replace(arch, kind="plain")).synthesis_macs == 0


def test_grown_params_add_off_diagonal_coefficients() -> None:
    arch = Arch(depth=16, width=1, members=2, templates=3, classes=10)
    n_hidden = 3 * 2 * arch.blocks_per_group + 3  # two convs per block, three projections
    extra = (arch.members ** 2 - arch.members) * arch.templates * n_hidden
    assert flops.count(arch.as_grown()).params - flops.count(arch).params == extra


def test_other_image_size_matches_torch() -> None:
    arch = Arch(depth=16, width=1, members=2, classes=10)
    assert flops.count(arch, 64).flops == flops.count_with_torch(arch, 64)
    assert flops.count(arch, 64).flops > flops.count(arch).flops


def test_train_flops_and_phases() -> None:
    assert flops.train_flops(10, 7) == 210
    assert flops.train_flops(10_486_772_736, 50_000 * 40) == 62_920_636_416_000_000
    arch = Arch(depth=16, width=2, members=2, classes=10)
    member = flops.count_member(arch).flops
    assert flops.phase_forward_flops(arch, "member0") == member
    assert flops.phase_forward_flops(arch, "member1") == member
    assert flops.phase_forward_flops(arch, "members") == 2 * member
    assert flops.phase_forward_flops(arch.as_grown(), "members") == 2 * member
    for bad in ("member2", "memberx", "grow:", "wide"):
        with pytest.raises(ValueError):
            flops.phase_forward_flops(arch, bad)


def test_report() -> None:
    arch = Arch(depth=16, width=2, members=2, classes=10)
    rep = flops.report(arch, {"wide": arch.as_grown()}, epochs={"members": 3, "wide": 2},
                       images_per_epoch=1000, batch_size=128)
    assert "2 x MACs" in rep["convention"] and "synthesis" in rep["convention"]
    mem, wide = rep["phases"]["members"], rep["phases"]["grow:wide"]
    assert wide["cost"]["flops"] == 785_224_704
    assert mem["cost"]["flops"] == 2 * mem["member"]["flops"]
    assert mem["train_flops"] == 3 * mem["cost"]["flops"] * 3000
    assert wide["train_flops"] == 3 * 785_224_704 * 2000
    assert rep["total_train_flops"] == mem["train_flops"] + wide["train_flops"]
    assert wide["steps"] == 2 * 8
    assert wide["synthesis_train_flops"] == 3 * wide["cost"]["synthesis_flops"] * 16
    # Without epochs and images it is costs only.
    bare = flops.report(arch, {"wide": arch.as_grown()})
    assert "train_flops" not in bare["phases"]["members"] and "total_train_flops" not in bare
