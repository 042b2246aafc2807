"""docs/ethernet-mesh.md's all-reduce table is what the model computes."""

from __future__ import annotations

from pathlib import Path

from ttedge import model_zoo
from ttedge.ethernet_mesh.collectives import Collective, plan_on_mesh
from ttedge.ethernet_mesh.sharding import plan_tensor_parallel
from ttedge.ethernet_mesh.topology import get_mesh

DOC = Path(__file__).parents[2] / "docs" / "ethernet-mesh.md"


def _modelled_row(mesh_name: str) -> str:
    card = model_zoo.find_card("llama-3.1-8b-instruct")
    assert card is not None
    mesh = get_mesh(mesh_name)
    plan = plan_tensor_parallel(card.config, mesh.num_chips)
    steps = plan_on_mesh(Collective.ALL_REDUCE, mesh).steps
    cells = [mesh_name, str(mesh.num_chips), "ring" if mesh.is_ring else "line", str(steps)]
    for batch in (1, 32):
        attention, mlp, logits = plan.decode_collectives(batch)
        one = attention.seconds(mesh) / attention.count
        cells += [
            f"{one * 1e6:.2f} µs",
            f"{(attention.seconds(mesh) + mlp.seconds(mesh)) * 1e3:.3f} ms",
            f"{logits.seconds(mesh) * 1e6:.1f} µs",
        ]
    return "| " + " | ".join(cells) + " |"


def test_all_reduce_table_matches_the_model() -> None:
    lines = DOC.read_text().splitlines()
    for mesh_name in ("n300", "t3k", "galaxy", "p150x4"):
        assert _modelled_row(mesh_name) in lines, mesh_name
