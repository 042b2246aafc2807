"""Built-in meshes, and the YAML loader's acceptance of the examples and its errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ttedge.ethernet_mesh.links import BLACKHOLE_ETHERNET, WORMHOLE_ETHERNET
from ttedge.ethernet_mesh.topology import (
    BUILT_IN_MESHES,
    EXAMPLES_DIR,
    MeshError,
    get_mesh,
    grid_ring_order,
    load_mesh,
)


@pytest.mark.parametrize(
    ("name", "shape", "ring", "link"),
    [
        ("n150", (1, 1), False, WORMHOLE_ETHERNET),
        ("n300", (1, 2), False, WORMHOLE_ETHERNET),
        ("t3k", (1, 8), True, WORMHOLE_ETHERNET),
        ("t3k-2x4", (2, 4), True, WORMHOLE_ETHERNET),
        ("galaxy", (4, 8), True, WORMHOLE_ETHERNET),
        ("p150x4", (1, 4), True, BLACKHOLE_ETHERNET),
        ("p150x8", (1, 8), True, BLACKHOLE_ETHERNET),
    ],
)
def test_built_in_meshes(name: str, shape: tuple[int, int], ring: bool, link: object) -> None:
    mesh = get_mesh(name)
    assert (mesh.shape, mesh.is_ring, mesh.link) == (shape, ring, link)
    assert sorted(mesh.order) == list(range(mesh.num_chips))


def test_t3k_views_are_the_same_links() -> None:
    """The 1x8 ring is the 2x4 grid renumbered along its ring walk: same pairs, same link counts."""
    line, grid = BUILT_IN_MESHES["t3k"], BUILT_IN_MESHES["t3k-2x4"]
    for i in range(8):
        for j in range(8):
            assert line.links_between(i, j) == grid.links_between(grid.order[i], grid.order[j])


def test_grid_ring_order_walks_neighbours() -> None:
    walk = grid_ring_order(4, 8)
    cells = [divmod(chip, 8) for chip in walk]
    for (r1, c1), (r2, c2) in zip(cells, cells[1:] + cells[:1], strict=True):
        assert abs(r1 - r2) + abs(c1 - c2) == 1
    with pytest.raises(ValueError, match="no ring"):
        grid_ring_order(3, 3)


def test_examples_load() -> None:
    line = load_mesh(EXAMPLES_DIR / "two-n300-line.yaml")
    assert (line.num_chips, line.is_ring, line.links_between(1, 2)) == (4, False, 2)
    square = get_mesh(EXAMPLES_DIR / "p150x2x2-ring.yaml")
    assert square.is_ring and square.order == (0, 1, 3, 2)
    assert square.link.bytes_per_s == 25e9 and square.link.latency_s == pytest.approx(2e-6)
    assert square.pair_bytes_per_s(0, 1) == 50e9


_VALID = """
name: custom
shape: [1, 3]
link: {kind: wormhole}
links:
  - {chips: [0, 1], count: 2}
  - {chips: [1, 2]}
"""


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ("[1, 2]}", "[1, 5]}", "links[1].chips", "unknown chip id 5"),
        ("[1, 2]}", "[2, 2]}", "links[1].chips", "chip 2 is linked to itself"),
        ("[1, 2]}", "[0, 1]}", "links[1].chips", "linked twice"),
        ("count: 2", "count: 0", "links[0].count", "at least one link"),
        ("  - {chips: [1, 2]}\n", "", "links", "disconnected: chips [2]"),
        ("{kind: wormhole}", "{kind: wormhole, bandwidth_gbps: -5}", "link.bandwidth_gbps", "non-negative"),
        ("{kind: wormhole}", "{kind: wormhole, latency_us: -1}", "link.latency_us", "non-negative"),
        ("{kind: wormhole}", "{kind: wormhole, bandwidth_gbps: 0}", "link.bandwidth_gbps", "no bandwidth"),
        ("{kind: wormhole}", "{kind: grayskull}", "link.kind", "'grayskull' is not one of"),
        ("shape: [1, 3]", "shape: [1, 0]", "shape", "two positive integers"),
        ("name: custom", "name: custom\nchip_count: 3", "chip_count", "unknown field"),
        ("name: custom", "name: custom\norder: [0, 2, 1]", "order", "chips 0 and 2 are not linked"),
        ("name: custom", "name: custom\norder: [0, 1]", "order", "every chip 0..2 once"),
    ],
)
def test_yaml_errors_name_file_and_field(
    tmp_path: Path, old: str, new: str, field: str, message: str
) -> None:
    assert old in _VALID
    path = tmp_path / "bad.yaml"
    path.write_text(_VALID.replace(old, new, 1))
    with pytest.raises(MeshError, match=re.escape(message)) as raised:
        load_mesh(path)
    assert raised.value.source == str(path) and raised.value.field == field


def test_valid_yaml_and_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(_VALID)
    mesh = load_mesh(path)
    assert (mesh.is_ring, mesh.links_between(0, 1), mesh.links_between(2, 1)) == (False, 2, 1)
    with pytest.raises(MeshError, match="cannot read"):
        load_mesh(tmp_path / "missing.yaml")
    with pytest.raises(MeshError, match="not a built-in mesh"):
        get_mesh("t4k")


def test_t3k_cards_keep_one_on_board_link() -> None:
    """Each column of the 2x4 grid is one n300 card (one on-board link usable); cables join the columns."""
    grid = BUILT_IN_MESHES["t3k-2x4"]
    assert [grid.links_between(c, c + 4) for c in range(4)] == [1, 1, 1, 1]
    assert [grid.links_between(c, c + 1) for c in (0, 1, 2, 4, 5, 6)] == [2] * 6
    assert grid.links_between(0, 5) == 0
