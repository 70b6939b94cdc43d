"""Drawing a `Graph` to PNG/SVG with matplotlib: layered top-to-bottom, colored by op."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ghn.graph.ops import OPS

_COLORS = {
    "input": "#9e9e9e",
    "dense": "#1f77b4",
    "conv": "#17becf",
    "dw_conv": "#17becf",
    "dil_conv": "#17becf",
    "embed": "#8c564b",
    "pos_enc": "#c49c94",
    "cls_token": "#c49c94",
    "bias": "#aec7e8",
    "ln": "#2ca02c",
    "rms_norm": "#2ca02c",
    "bn": "#2ca02c",
    "gn": "#2ca02c",
    "scale": "#98df8a",
    "attn": "#d62728",
    "sum": "#ff7f0e",
    "mul": "#ffbb78",
    "concat": "#ffbb78",
    "max_pool": "#9467bd",
    "avg_pool": "#9467bd",
    "glob_avg": "#c5b0d5",
    "glob_max": "#c5b0d5",
    "param": "#7f7f7f",
}


def _layers(graph) -> np.ndarray:
    """Longest-path depth of each node; nodes are already in topological order."""
    depth = np.zeros(graph.num_nodes, np.int64)
    order = np.argsort(graph.edges[:, 1], kind="stable") if graph.num_edges else []
    for s, t in graph.edges[order]:
        depth[t] = max(depth[t], depth[s] + 1)
    return depth


def draw_graph(graph, path, *, title: str | None = None, label_shapes: bool = True) -> Path:
    """Writes the graph as PNG or SVG (chosen by the file extension)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"draw writes .png, .svg or .pdf files, got '{path.suffix}'")
    depth = _layers(graph)
    n_layers = int(depth.max()) + 1 if graph.num_nodes else 1
    pos = np.zeros((graph.num_nodes, 2))
    width = 1
    for d in range(n_layers):
        members = np.flatnonzero(depth == d)
        width = max(width, len(members))
        for k, i in enumerate(members):
            pos[i] = (k - (len(members) - 1) / 2, -d)
    fig_w = max(6.0, 2.2 * width + 3)
    fig_h = max(4.0, 0.55 * n_layers + 1.5)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    for s, t in graph.edges:
        (x0, y0), (x1, y1) = pos[s], pos[t]
        skip = depth[t] - depth[s] > 1
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops=dict(
                arrowstyle="-|>",
                color="#555555" if not skip else "#bbbbbb",
                lw=0.7,
                shrinkA=7,
                shrinkB=7,
                connectionstyle="arc3,rad=0.25" if skip else "arc3",
            ),
        )
    for i, shared in enumerate(graph.node_shared):
        for param in shared:
            (x0, y0), (x1, y1) = pos[graph.params[param].node], pos[i]
            ax.annotate(
                "",
                xy=(x1, y1),
                xytext=(x0, y0),
                arrowprops=dict(
                    arrowstyle="-",
                    color="#8c564b",
                    lw=0.9,
                    ls="--",
                    shrinkA=7,
                    shrinkB=7,
                    connectionstyle="arc3,rad=-0.3",
                ),
            )
    for i in range(graph.num_nodes):
        op = graph.node_ops[i]
        ax.scatter(*pos[i], s=140, color=_COLORS.get(op, "#7f7f7f"), zorder=3, edgecolors="k")
        label = op
        if graph.node_shared[i]:
            label += " (tied)"
        if label_shapes and any(graph.node_shapes[i]):
            dims = [int(v) for v in graph.node_shapes[i]]
            while len(dims) > 1 and dims[-1] == 1:
                dims.pop()
            label += " " + "x".join(map(str, dims))
        ax.text(pos[i][0] + 0.12, pos[i][1], label, fontsize=7, va="center", zorder=4)
    used = [op for op in OPS if op in set(graph.node_ops)]
    handles = [
        Line2D([], [], marker="o", ls="", color=_COLORS.get(op, "#7f7f7f"), mec="k", label=op)
        for op in used
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=7, frameon=False)
    ax.set_title(
        title
        or f"{graph.model_name}: {graph.num_nodes} nodes, {graph.num_edges} edges, "
        f"{graph.num_params:,} parameters",
        fontsize=9,
    )
    ax.set_xlim(-width / 2 - 0.5, width / 2 + 2.5)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
