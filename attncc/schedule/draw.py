"""Pictures of a schedule: a text tile map (`str(schedule)`) and an optional PNG.

Text map: a header line, then per head class one line per query tile with one character per
key tile — `█` FULL, `▒` PARTIAL, `·` EMPTY — and a last line that says so (`KEY`). Maps
larger than `max_rows` × `max_cols` are downsampled (a cell covers a block of tiles: `█` if all
of them are FULL, `·` if all are EMPTY, else `▒`) and the header says so.

PNG: the dense mask (black = kept) beside the tile classes, each with a colour key; axes are
in tokens and tiles (integer ticks). Large maps are downsampled with max (a cell is kept if any
pair in it is kept; a tile cell is FULL/EMPTY only if all its tiles are), so thin structure
such as a few sink columns stays visible.
"""
from __future__ import annotations

from typing import Optional

import torch

from .schedule import Schedule, TileClass

GLYPH = {int(TileClass.FULL): "█", int(TileClass.PARTIAL): "▒", int(TileClass.EMPTY): "·"}
KEY = "key: █ FULL (no mask code)  ▒ PARTIAL (mask evaluated)  · EMPTY (skipped)"
# Cells per side of a PNG panel before it is downsampled (about the panel's size in pixels).
PNG_CELLS = 200


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
    lines.append(KEY)
    return "\n".join(lines) + "\n"


def pool_any(mask: torch.Tensor, max_cells: int) -> tuple[torch.Tensor, int, int]:
    """(cells, rows per cell, cols per cell): a bool [R, C] mask max-pooled to at most
    `max_cells` per side — a cell is True if any entry in its block is (never an average,
    which would let a thin kept line fade away)."""
    R, C = mask.shape
    fr, fc = max(1, -(-R // max_cells)), max(1, -(-C // max_cells))
    if fr == 1 and fc == 1:
        return mask, 1, 1
    padded = torch.nn.functional.pad(mask.float(), (0, -(-C // fc) * fc - C, 0, -(-R // fr) * fr - R))
    return torch.nn.functional.max_pool2d(padded[None, None], (fr, fc))[0, 0] > 0, fr, fc


def figure(schedule: Schedule, head: int = 0, max_dense: int = 1 << 22,
           max_cells: int = PNG_CELLS):
    """The matplotlib Figure `draw_png` saves: the dense mask of `head` (when q_len·kv_len ≤
    max_dense and the mask is static) beside its tile classes, each panel with a colour key
    and integer ticks in tokens / tiles; panels larger than `max_cells` per side are
    downsampled with max (`pool_any`, `downsample`). Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    s = schedule
    tiles, tr, tc = downsample(s.tile_matrix(head), max_cells, max_cells)
    dense = None
    if s.q_len * s.kv_len <= max_dense and not s.runtime and not s.pattern.inputs:
        dense, dr, dc = pool_any(s.pattern.dense_mask(s.q_len, s.kv_len, heads=s.heads)[0, head],
                                 max_cells)
    n = 2 if dense is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 5.4), squeeze=False)

    def integer_axes(ax, rows, cols, xlabel, ylabel):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        for axis, n in ((ax.xaxis, cols), (ax.yaxis, rows)):
            if n <= 16:  # small maps: a tick on every tile / token
                axis.set_ticks(range(n))
            else:
                axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        for spine in ax.spines.values():  # a light frame, so edge rows/columns stay visible
            spine.set_color("#bbbbbb")

    def key(ax, colors, labels):
        ax.legend(handles=[Patch(facecolor=c, edgecolor="#999999", label=name)
                           for c, name in zip(colors, labels)],
                  loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(labels),
                  fontsize="small", frameon=False)

    if dense is not None:
        ax = axes[0, 0]
        # extent in tokens, so ticks name token indices even when cells are pooled
        ax.imshow(dense.numpy(), cmap=ListedColormap(["#ffffff", "#000000"]), vmin=0, vmax=1,
                  interpolation="nearest", extent=(-0.5, s.kv_len - 0.5, s.q_len - 0.5, -0.5))
        pooled = f", cells of {dr}×{dc} (max)" if dr > 1 or dc > 1 else ""
        ax.set_title(f"{s.pattern.name}: mask (head {head}){pooled}")
        integer_axes(ax, s.q_len, s.kv_len, "key", "query")
        key(ax, ["#000000", "#ffffff"], ["kept", "masked"])
    cmap = ListedColormap(["#ffffff", "#9ecae1", "#08519c"])
    ax = axes[0, n - 1]
    ax.imshow(tiles.numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest",
              extent=(-0.5, s.n_kv_tiles - 0.5, s.n_q_tiles - 0.5, -0.5))
    pooled = f", cells of {tr}×{tc}" if tr > 1 or tc > 1 else ""
    ax.set_title(f"tiles {s.stats.get('q_tile')}×{s.stats.get('kv_tile')}: "
                 f"density {_fmt(s.density())}, efficiency {_fmt(s.efficiency())}{pooled}",
                 fontsize="medium")
    integer_axes(ax, s.n_q_tiles, s.n_kv_tiles, "key tile", "query tile")
    key(ax, cmap.colors, ("EMPTY (skipped)", "PARTIAL (masked)", "FULL (no mask code)"))
    fig.tight_layout()
    return fig


def draw_png(schedule: Schedule, path: str, head: int = 0, max_dense: int = 1 << 22) -> None:
    """Write `figure(schedule, head)` as a PNG: the dense mask of `head` (when q_len·kv_len ≤
    max_dense and the mask is static) beside its tile classification, with colour keys.
    Needs matplotlib (`pip install 'attncc[plot]'`)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("drawing a schedule needs matplotlib: pip install 'attncc[plot]'") from e
    fig = figure(schedule, head=head, max_dense=max_dense)
    fig.savefig(path, dpi=100)
    plt.close(fig)
