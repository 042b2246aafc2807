"""Named meshes of Tenstorrent chips: shape, which chip pairs are linked and by how many Ethernet links,
and the order in which a 1-D tensor-parallel group walks the chips (a ring when the last chip is linked
back to the first, a line otherwise). Built-ins for the shipped systems, and a YAML loader for custom ones.

Chips are numbered row-major over the mesh shape: chip ``r * cols + c`` sits at row ``r``, column ``c``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .links import BLACKHOLE_ETHERNET, GIGABIT, LINK_KINDS, MICROSECOND, WORMHOLE_ETHERNET, LinkSpec

EXAMPLES_DIR = Path(__file__).parent / "meshes"


class MeshError(ValueError):
    """A mesh description that cannot be used; names its source and, where one is at fault, the field."""

    def __init__(self, source: str, field: str | None, message: str):
        where = source if field is None else f"{source} [{field}]"
        super().__init__(f"{where}: {message}")
        self.source = source
        self.field = field


@dataclass(frozen=True)
class Connection:
    """``links`` parallel Ethernet links between chips ``a`` and ``b`` (a < b)."""

    a: int
    b: int
    links: int


@dataclass(frozen=True)
class Mesh:
    name: str
    shape: tuple[int, int]
    link: LinkSpec
    connections: tuple[Connection, ...]
    # The 1-D order a tensor-parallel group walks; consecutive chips are linked.
    order: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return self.shape[0] * self.shape[1]

    def links_between(self, a: int, b: int) -> int:
        low, high = min(a, b), max(a, b)
        return sum(c.links for c in self.connections if (c.a, c.b) == (low, high))

    @property
    def is_ring(self) -> bool:
        """The order closes on itself: the last chip is linked to the first (two chips count as a line)."""
        return self.num_chips > 2 and self.links_between(self.order[-1], self.order[0]) > 0

    def pair_bytes_per_s(self, a: int, b: int) -> float:
        """Bandwidth one way between two linked chips: their links work in parallel."""
        return self.links_between(a, b) * self.link.bytes_per_s

    def validated(self, source: str) -> Mesh:
        """Checks the description is usable; errors name ``source`` and the offending field."""
        rows, cols = self.shape
        if rows < 1 or cols < 1:
            raise MeshError(source, "shape", f"expected two positive integers, got {list(self.shape)}")
        seen: set[tuple[int, int]] = set()
        for i, c in enumerate(self.connections):
            field = f"links[{i}]"
            for chip in (c.a, c.b):
                if not 0 <= chip < self.num_chips:
                    raise MeshError(
                        source,
                        f"{field}.chips",
                        f"unknown chip id {chip}: a {rows}x{cols} mesh has chips 0..{self.num_chips - 1}",
                    )
            if c.a == c.b:
                raise MeshError(source, f"{field}.chips", f"chip {c.a} is linked to itself")
            if (c.a, c.b) in seen:
                raise MeshError(source, f"{field}.chips", f"chips {c.a} and {c.b} are linked twice")
            seen.add((c.a, c.b))
            if c.links < 1:
                raise MeshError(source, f"{field}.count", f"expected at least one link, got {c.links}")
        unreachable = _unreachable_chips(self.num_chips, self.connections)
        if unreachable:
            raise MeshError(
                source,
                "links",
                f"the mesh is disconnected: chips {unreachable} cannot be reached from chip 0",
            )
        if sorted(self.order) != list(range(self.num_chips)):
            raise MeshError(source, "order", f"must list every chip 0..{self.num_chips - 1} once")
        for a, b in zip(self.order, self.order[1:], strict=False):
            if not self.links_between(a, b):
                raise MeshError(source, "order", f"consecutive chips {a} and {b} are not linked")
        return self


def _unreachable_chips(num_chips: int, connections: Iterable[Connection]) -> list[int]:
    neighbours: dict[int, set[int]] = {chip: set() for chip in range(num_chips)}
    for c in connections:
        neighbours[c.a].add(c.b)
        neighbours[c.b].add(c.a)
    reached, frontier = {0}, [0]
    while frontier:
        for nxt in neighbours[frontier.pop()] - reached:
            reached.add(nxt)
            frontier.append(nxt)
    return sorted(set(range(num_chips)) - reached)


def grid_connections(rows: int, cols: int, row_links: int, column_links: int) -> tuple[Connection, ...]:
    """Every pair of chips adjacent in the grid (no wrap-around): ``row_links`` links between neighbours in
    a row, ``column_links`` between neighbours in a column."""
    pairs = []
    for r in range(rows):
        for c in range(cols):
            chip = r * cols + c
            if c + 1 < cols:
                pairs.append(Connection(chip, chip + 1, row_links))
            if r + 1 < rows:
                pairs.append(Connection(chip, chip + cols, column_links))
    return tuple(pairs)


def grid_ring_order(rows: int, cols: int) -> tuple[int, ...]:
    """A closed walk through every chip of a grid with an even number of rows (both at least 2):
    along the top row, snake back and forth through columns 1.. row by row, then up column 0."""
    if rows % 2 or rows < 2 or cols < 2:
        raise ValueError(f"a {rows}x{cols} grid has no ring through its neighbour links")
    walk = [(0, 0)]
    for r in range(rows):
        columns = range(1, cols) if r % 2 == 0 else range(cols - 1, 0, -1)
        walk.extend((r, c) for c in columns)
    walk.extend((r, 0) for r in range(rows - 1, 0, -1))
    return tuple(r * cols + c for r, c in walk)


def ring_connections(num_chips: int, links: int) -> tuple[Connection, ...]:
    """Chip i linked to chip i+1, and the last back to the first."""
    pairs = [Connection(i, i + 1, links) for i in range(num_chips - 1)]
    return (*pairs, Connection(0, num_chips - 1, links))


_T3K_GRID = grid_connections(2, 4, row_links=2, column_links=1)


def _built_in() -> dict[str, Mesh]:
    meshes = [
        Mesh("n150", (1, 1), WORMHOLE_ETHERNET, (), (0,)),
        # n300: two on-board links; one is kept for dispatch (links.py), the other carries collectives.
        Mesh("n300", (1, 2), WORMHOLE_ETHERNET, (Connection(0, 1, 1),), (0, 1)),
        # T3K: four n300 cards as a 2x4 grid; each column is one card (chips 0-3 are the PCIe-attached ones),
        # so column neighbours keep one usable on-board link. ASSUMPTION: two cabled links between row
        # neighbours. The 1x8 view is the same grid renumbered along its ring walk.
        Mesh("t3k", (1, 8), WORMHOLE_ETHERNET, _t3k_as_line_of_8(), tuple(range(8))),
        Mesh("t3k-2x4", (2, 4), WORMHOLE_ETHERNET, _T3K_GRID, grid_ring_order(2, 4)),
        # Galaxy: 32 Wormhole chips in a 4x8 grid whose inner chips use all 16 links. ASSUMPTION: four links
        # to each of the four neighbours; no wrap-around links modelled.
        Mesh("galaxy", (4, 8), WORMHOLE_ETHERNET, grid_connections(4, 8, 4, 4), grid_ring_order(4, 8)),
        # Boxes of p150 cards cabled in a ring. ASSUMPTION: two of each card's four 800G ports go to each
        # neighbour, i.e. 2 ports x 2 links (links.py) = 4 links per neighbour pair.
        Mesh("p150x4", (1, 4), BLACKHOLE_ETHERNET, ring_connections(4, 4), tuple(range(4))),
        Mesh("p150x8", (1, 8), BLACKHOLE_ETHERNET, ring_connections(8, 4), tuple(range(8))),
    ]
    return {mesh.name: mesh.validated(f"built-in mesh {mesh.name!r}") for mesh in meshes}


def _t3k_as_line_of_8() -> tuple[Connection, ...]:
    """The T3K grid's links renumbered so that the ring walk of the 2x4 grid reads 0, 1, ..., 7."""
    walk = grid_ring_order(2, 4)
    position = {chip: i for i, chip in enumerate(walk)}
    renumbered = (
        Connection(min(position[c.a], position[c.b]), max(position[c.a], position[c.b]), c.links)
        for c in _T3K_GRID
    )
    return tuple(sorted(renumbered, key=lambda c: (c.a, c.b)))


BUILT_IN_MESHES: Mapping[str, Mesh] = _built_in()


def get_mesh(name_or_path: str | Path) -> Mesh:
    """A built-in mesh by name, or a custom one from a YAML file."""
    if str(name_or_path) in BUILT_IN_MESHES:
        return BUILT_IN_MESHES[str(name_or_path)]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return load_mesh(path)
    raise MeshError(
        str(name_or_path), None, f"not a built-in mesh ({', '.join(BUILT_IN_MESHES)}) nor a YAML file"
    )


_TOP_FIELDS = {"name", "shape", "link", "links", "order"}
_LINK_FIELDS = {"kind", "bandwidth_gbps", "latency_us"}


def load_mesh(path: str | Path) -> Mesh:
    """Reads a custom mesh (format: docs/ethernet-mesh.md; examples: ethernet_mesh/meshes/)."""
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise MeshError(source, None, f"cannot read: {error}") from error
    return parse_mesh(data, source)


def parse_mesh(data: Any, source: str) -> Mesh:
    if not isinstance(data, dict):
        raise MeshError(source, None, f"expected a mapping at the top level, got {type(data).__name__}")
    _reject_unknown(data, _TOP_FIELDS, source, "")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise MeshError(source, "name", f"expected a non-empty string, got {name!r}")
    shape = data.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
        raise MeshError(source, "shape", f"expected [rows, cols] as two positive integers, got {shape!r}")
    link = _parse_link(data.get("link"), source)
    raw_links = data.get("links", [])
    if not isinstance(raw_links, list):
        raise MeshError(source, "links", f"expected a list, got {raw_links!r}")
    connections = tuple(_parse_connection(entry, source, f"links[{i}]") for i, entry in enumerate(raw_links))
    order = data.get("order", list(range(shape[0] * shape[1])))
    if not (isinstance(order, list) and all(_is_int(v) for v in order)):
        raise MeshError(source, "order", f"expected a list of chip ids, got {order!r}")
    return Mesh(name, (shape[0], shape[1]), link, connections, tuple(order)).validated(source)


def _parse_link(data: Any, source: str) -> LinkSpec:
    if not isinstance(data, dict):
        raise MeshError(
            source, "link", f"expected a mapping with kind, bandwidth_gbps or latency_us, got {data!r}"
        )
    _reject_unknown(data, _LINK_FIELDS, source, "link.")
    kind = data.get("kind", "wormhole")
    if kind not in LINK_KINDS:
        raise MeshError(source, "link.kind", f"{kind!r} is not one of {', '.join(LINK_KINDS)}")
    base = LINK_KINDS[kind]
    bandwidth = _non_negative(data, "bandwidth_gbps", base.bytes_per_s / GIGABIT, source)
    if bandwidth == 0:
        raise MeshError(source, "link.bandwidth_gbps", "a link with no bandwidth carries nothing")
    latency = _non_negative(data, "latency_us", base.latency_s / MICROSECOND, source)
    customised = "bandwidth_gbps" in data or "latency_us" in data
    return LinkSpec(
        name=kind,
        bytes_per_s=bandwidth * GIGABIT,
        latency_s=latency * MICROSECOND,
        source=f"{source} (custom)" if customised else base.source,
    )


def _non_negative(data: dict[str, Any], key: str, default: float, source: str) -> float:
    value = data.get(key, default)
    if not (isinstance(value, int | float) and not isinstance(value, bool)) or value < 0:
        raise MeshError(source, f"link.{key}", f"expected a non-negative number, got {value!r}")
    return float(value)


def _parse_connection(entry: Any, source: str, field: str) -> Connection:
    if not isinstance(entry, dict):
        raise MeshError(source, field, f"expected a mapping with chips and count, got {entry!r}")
    _reject_unknown(entry, {"chips", "count"}, source, f"{field}.")
    chips = entry.get("chips")
    if not (isinstance(chips, list) and len(chips) == 2 and all(_is_int(v) for v in chips)):
        raise MeshError(source, f"{field}.chips", f"expected two chip ids, got {chips!r}")
    count = entry.get("count", 1)
    if not _is_int(count):
        raise MeshError(source, f"{field}.count", f"expected an integer, got {count!r}")
    return Connection(min(chips), max(chips), count)


def _reject_unknown(data: dict[str, Any], known: set[str], source: str, prefix: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise MeshError(
            source, f"{prefix}{unknown[0]}", f"unknown field (expected: {', '.join(sorted(known))})"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
