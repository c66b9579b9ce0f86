"""Pictures of a schedule: a text tile map (`str(schedule)`) and an optional PNG.

Text map: a header line, then per head class one line per query tile with one character per
key tile — `█` FULL, `▒` PARTIAL, `·` EMPTY. Maps larger than `max_rows` × `max_cols` are
downsampled (a cell covers a block of tiles: `█` if all of them are FULL, `·` if all are
EMPTY, else `▒`) and the header says so.
"""
from __future__ import annotations

from typing import Optional

import torch

from .schedule import Schedule, TileClass

GLYPH = {int(TileClass.FULL): "█", int(TileClass.PARTIAL): "▒", int(TileClass.EMPTY): "·"}


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _ranges(heads: tuple[int, ...]) -> str:
    parts, start = [], None
    for i, h in enumerate(heads):
        if start is None:
            start = h
        if i + 1 == len(heads) or heads[i + 1] != h + 1:
            parts.append(str(start) if start == h else f"{start}-{h}")
            start = None
    return ",".join(parts)


def downsample(m: torch.Tensor, max_rows: int, max_cols: int) -> tuple[torch.Tensor, int, int]:
    """(cells, rows per cell, cols per cell) of an int8 class matrix."""
    R, C = m.shape
    fr, fc = max(1, -(-R // max_rows)), max(1, -(-C // max_cols))
    if fr == 1 and fc == 1:
        return m, 1, 1
    pr, pc = -(-R // fr) * fr - R, -(-C // fc) * fc - C
    lo = torch.nn.functional.pad(m.float(), (0, pc, 0, pr), value=float(TileClass.FULL))
    hi = torch.nn.functional.pad(m.float(), (0, pc, 0, pr), value=float(TileClass.EMPTY))
    mn = -torch.nn.functional.max_pool2d(-lo[None, None], (fr, fc))[0, 0]
    mx = torch.nn.functional.max_pool2d(hi[None, None], (fr, fc))[0, 0]
    out = torch.full(mn.shape, int(TileClass.PARTIAL), dtype=torch.int8)
    out[mn == int(TileClass.FULL)] = int(TileClass.FULL)
    out[mx == int(TileClass.EMPTY)] = int(TileClass.EMPTY)
    return out, fr, fc


def draw_text(s: Schedule, max_rows: int = 64, max_cols: int = 96) -> str:
    """The text tile map of `s` (see module docstring)."""
    st = s.stats
    head = (f"schedule {s.pattern.name}: q_len={s.q_len} kv_len={s.kv_len} heads={s.heads} "
            f"tiles q {st.get('q_tile')} × kv {st.get('kv_tile')} "
            f"({s.n_q_tiles}×{s.n_kv_tiles}) density={_fmt(s.density())} "
            f"efficiency={_fmt(s.efficiency())} fallback={st.get('fallback_tiles')}/{st.get('tiles')} "
            f"classes={len(s.classes)}")
    if s.runtime:
        head += " runtime=" + ",".join(s.runtime)
    lines = [head]
    for ci, hc in enumerate(s.classes):
        m = hc.classes(s.n_kv_tiles)
        cells, fr, fc = downsample(m, max_rows, max_cols)
        note = f" (downsampled: each cell is {fr}×{fc} tiles)" if fr > 1 or fc > 1 else ""
        bounds = " closed-form" if hc.bounds is not None else ""
        lines.append(f"class {ci} heads {_ranges(hc.heads)}: full={hc.full.nnz} "
                     f"partial={hc.partial.nnz}{bounds}{note}")
        for row in cells.tolist():
            lines.append("".join(GLYPH[v] for v in row))
    return "\n".join(lines) + "\n"


def draw_png(schedule: Schedule, path: str, head: int = 0, max_dense: int = 1 << 22) -> None:
    """Write a PNG: the dense mask of `head` (when q_len·kv_len ≤ max_dense and the mask is
    static) beside its tile classification. Needs matplotlib (`pip install 'attncc[plot]'`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("drawing a schedule needs matplotlib: pip install 'attncc[plot]'") from e
    s = schedule
    tiles = s.tile_matrix(head).numpy()
    dense = None
    if s.q_len * s.kv_len <= max_dense and not s.runtime and not s.pattern.inputs:
        dense = s.pattern.dense_mask(s.q_len, s.kv_len, heads=s.heads)[0, head].numpy()
    n = 2 if dense is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 5), squeeze=False)
    if dense is not None:
        axes[0, 0].imshow(dense, cmap="Greys", interpolation="nearest")
        axes[0, 0].set_title(f"{s.pattern.name}: mask (head {head})")
        axes[0, 0].set_xlabel("key")
        axes[0, 0].set_ylabel("query")
    cmap = ListedColormap(["#ffffff", "#9ecae1", "#08519c"])
    ax = axes[0, n - 1]
    ax.imshow(tiles, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    ax.set_title(f"tiles {s.stats.get('q_tile')}×{s.stats.get('kv_tile')}: "
                 f"density {_fmt(s.density())}, efficiency {_fmt(s.efficiency())}")
    ax.set_xlabel("key tile")
    ax.set_ylabel("query tile")
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#999999", label=name) for c, name in
                       zip(cmap.colors, ("EMPTY (skipped)", "PARTIAL (masked)", "FULL (no mask code)"))],
              loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
