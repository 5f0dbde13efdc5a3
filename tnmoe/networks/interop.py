"""Interop with the ``tensornetwork`` library (off the training hot path).

* :func:`to_tensornetwork` / :func:`from_tensornetwork`: an MPO as connected ``tn.Node`` objects.
* :func:`to_finite_mpo` / :func:`from_finite_mpo`: ``tensornetwork.FiniteMPO`` (its core layout is
  ``(left, right, out, in)``).
* :func:`contract_network`: contract any user-built node graph with an opt_einsum path via our
  cached :class:`~tnmoe.networks.ContractionEngine` (torch tensors keep autograd).
"""

from __future__ import annotations

from typing import Sequence

import opt_einsum as oe
import torch

from .contraction import ContractionEngine, default_engine
from .mpo import MPO

__all__ = [
    "to_tensornetwork",
    "from_tensornetwork",
    "to_finite_mpo",
    "from_finite_mpo",
    "network_to_einsum",
    "contract_network",
]


def _tn():
    """The ``tensornetwork`` module, imported on first use (it is heavy and not needed for
    training), so ``import tnmoe`` does not import it."""
    import tensornetwork

    return tensornetwork


def to_tensornetwork(mpo: MPO, backend: str = "pytorch"):
    """MPO -> ``(nodes, out_edges, in_edges)``: m connected nodes with axes
    ``(left, out, in, right)``; the dangling ``out``/``in`` edges in site order."""
    tn = _tn()
    nodes = [tn.Node(c, name=f"core{k}", backend=backend, axis_names=["left", "out", "in", "right"])
             for k, c in enumerate(mpo.cores)]
    for a, b in zip(nodes[:-1], nodes[1:]):
        tn.connect(a["right"], b["left"], name=f"bond{a.name}-{b.name}")
    return nodes, [n["out"] for n in nodes], [n["in"] for n in nodes]


def from_tensornetwork(nodes: Sequence) -> MPO:
    """Inverse of :func:`to_tensornetwork`: nodes in chain order with 4 axes (left, out, in, right)."""
    cores = []
    for k, node in enumerate(nodes):
        t = node.tensor
        cores.append(t if isinstance(t, torch.Tensor) else torch.as_tensor(t))
        if len(node.edges) != 4:
            raise ValueError(f"node {k} ({node.name}) has {len(node.edges)} axes, expected 4")
    for k in range(len(nodes) - 1):
        if nodes[k][3] is not nodes[k + 1][0]:
            raise ValueError(f"node {k} axis 3 is not connected to node {k + 1} axis 0")
    return MPO(cores)


def to_finite_mpo(mpo: MPO, backend: str = "pytorch"):
    """As ``tensornetwork.FiniteMPO`` (requires the usual boundary bonds of 1)."""
    return _tn().FiniteMPO([c.permute(0, 3, 1, 2) for c in mpo.cores], backend=backend)


def from_finite_mpo(fmpo) -> MPO:
    tensors = [t if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in fmpo.tensors]
    return MPO([t.permute(0, 2, 3, 1) for t in tensors])


def network_to_einsum(nodes: Sequence, output_edge_order: Sequence = ()) -> tuple[str, list]:
    """Einsum equation and operand tensors of a node graph; dangling edges become outputs
    in ``output_edge_order``. Every dangling edge must be listed, except size-1 edges (such as
    an MPO's boundary bonds), which are summed away."""
    nodes = list(nodes)
    symbols: dict[int, str] = {}

    def sym(edge) -> str:
        if id(edge) not in symbols:
            symbols[id(edge)] = oe.get_symbol(len(symbols))
        return symbols[id(edge)]

    inside = {id(n) for n in nodes}
    for n in nodes:
        for e in n.edges:
            if not e.is_dangling() and not (id(e.node1) in inside and id(e.node2) in inside):
                raise ValueError(
                    f"node {n.name!r}: edge {e.name!r} connects to a node that is not in `nodes`; "
                    "pass every node of the network (or disconnect the edge first)"
                )
    terms = ["".join(sym(e) for e in n.edges) for n in nodes]
    dangling = {id(e) for n in nodes for e in n.edges if e.is_dangling() and e.dimension != 1}
    listed = {id(e) for e in output_edge_order}
    if not dangling <= listed or any(not e.is_dangling() for e in output_edge_order):
        raise ValueError(
            f"output_edge_order must list the {len(dangling)} dangling edges (of size > 1) of the "
            f"network and only dangling edges; got {len(listed)} edges, "
            f"{len(listed & dangling)} of them among those dangling edges"
        )
    out = "".join(sym(e) for e in output_edge_order)
    return ",".join(terms) + "->" + out, [n.tensor for n in nodes]


def contract_network(
    nodes: Sequence, output_edge_order: Sequence = (), engine: ContractionEngine | None = None
) -> torch.Tensor:
    """Contract a tensornetwork graph of torch-backed nodes with the engine's cached optimal path."""
    eq, tensors = network_to_einsum(nodes, output_edge_order)
    tensors = [t if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in tensors]
    return (engine or default_engine()).contract(eq, *tensors)
