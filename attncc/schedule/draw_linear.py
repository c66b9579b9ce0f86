"""Pictures of the chunked linear algorithm: what a separable `normalize none` spec runs
instead of a tile schedule (`attncc show`).

The linear algorithm (`attncc.runtime.linear`, Lightning Attention-2) places query q at key
position p = q + d (d: the proved diagonal `k <= q + d`) and cuts positions into chunks of C
tokens. For the query chunk i it multiplies with key chunk i directly, with the causal mask
inside (the diagonal block), and takes every earlier key chunk from the running D×Dv state
that the chunks before it updated (decayed by r_h^C per chunk): no other (query, key) block
is visited, and the work per chunk does not grow with the position.

Text map: a header, one line per query chunk (chunks of the positions q + d; the torch path's
chunk is the query tile size `block_m`, the Triton kernel's 32 tokens) with one character per
key chunk, and a key line:

    ▒  diagonal block: computed directly, causal mask inside
    ░  earlier chunk: carried by the running state (no block visited)
    ·  not attended

Maps larger than max_rows × max_cols are downsampled (a cell shows the strongest entry of
its block: ▒ over ░ over ·) and the header says so.
"""
from __future__ import annotations

import math

import torch

__all__ = ["DIAGONAL", "STATE", "NONE", "LINEAR_KEY", "chunk_map", "linear_text",
           "linear_figure", "draw_linear_png"]

NONE, STATE, DIAGONAL = 0, 1, 2
GLYPH = {NONE: "·", STATE: "░", DIAGONAL: "▒"}
LINEAR_KEY = ("key: ▒ diagonal block (computed directly, causal mask inside)  ░ earlier chunk "
              "(carried by the running D×Dv state: no block visited)  · not attended")


def chunk_map(q_len: int, kv_len: int, offset: int, chunk: int) -> torch.Tensor:
    """int8 [query chunks, key chunks]: DIAGONAL, STATE or NONE per (query chunk, key chunk)
    of the linear algorithm with diagonal `k <= q + offset` and `chunk`-token chunks. The
    algorithm runs over positions 0 .. max(kv_len, offset + q_len) − 1 (query q at position
    q + offset; positions without a query are zero rows), so every position chunk is a row."""
    n = max(kv_len, offset + q_len)
    nq, nk = -(-n // chunk), -(-kv_len // chunk)
    i = torch.arange(nq).view(-1, 1)
    j = torch.arange(nk).view(1, -1)
    return torch.where(j == i, DIAGONAL, torch.where(j < i, STATE, NONE)).to(torch.int8)


def _downsample(m: torch.Tensor, max_rows: int, max_cols: int):
    R, C = m.shape
    fr, fc = max(1, -(-R // max_rows)), max(1, -(-C // max_cols))
    if (fr, fc) == (1, 1) or m.numel() == 0:
        return m, 1, 1
    padded = torch.nn.functional.pad(m.float(), (0, -(-C // fc) * fc - C, 0, -(-R // fr) * fr - R))
    return torch.nn.functional.max_pool2d(padded[None, None], (fr, fc))[0, 0].to(torch.int8), fr, fc


def linear_text(pattern, q_len: int, kv_len: int, heads: int, chunk: int, decision, values,
                max_rows: int = 64, max_cols: int = 96) -> str:
    """The text map of the linear algorithm for a call shape (see the module docstring).
    `decision`, `values`: `attncc.passes.linear.decide(pattern, heads, q_len, kv_len)` of a
    separable pattern."""
    c, log_r = values
    d = decision.form.offset(q_len, kv_len)
    m = chunk_map(q_len, kv_len, d, chunk)
    cells, fr, fc = _downsample(m, max_rows, max_cols)
    diag, state = int((m == DIAGONAL).sum()), int((m == STATE).sum())
    note = f" (downsampled: each cell is {fr}×{fc} chunks)" if fr > 1 or fc > 1 else ""
    lines = [f"linear {pattern.name}: q_len={q_len} kv_len={kv_len} heads={heads} "
             f"chunks of {chunk} tokens ({m.shape[0]}×{m.shape[1]}; the Triton kernel uses 32) "
             f"diagonal k <= q + {d} algorithm=chunked linear (Lightning Attention-2)",
             f"  why: {decision.reason}",
             "  decay r_h: " + ", ".join(f"{math.exp(x):.6g}" for x in log_r.tolist()),
             "  factor c_h: " + ", ".join(f"{x:.6g}" for x in c.tolist()),
             f"visited: {diag} diagonal blocks of {chunk}×{chunk}; {state} earlier (query chunk, "
             f"key chunk) pairs come from the state (one D×Dv update per chunk){note}"]
    for row in cells.tolist():
        lines.append("".join(GLYPH[v] for v in row))
    lines.append(LINEAR_KEY)
    return "\n".join(lines) + "\n"


def linear_figure(pattern, q_len: int, kv_len: int, heads: int, chunk: int, decision,
                  head: int = 0, max_dense: int = 1 << 22, max_cells: int = 200):
    """Matplotlib Figure: the dense mask of `head` (when q_len·kv_len ≤ max_dense) beside the
    chunk map of the linear algorithm, each with a colour key. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .draw import pool_any
    d = decision.form.offset(q_len, kv_len)
    m, fr, fc = _downsample(chunk_map(q_len, kv_len, d, chunk), max_cells, max_cells)
    dense = None
    if q_len * kv_len <= max_dense:
        dense, dr, dc = pool_any(pattern.dense_mask(q_len, kv_len, heads=heads)[0, head],
                                 max_cells)
    n = 2 if dense is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 5.8), squeeze=False)

    def key(ax, colors, labels):
        ax.legend(handles=[Patch(facecolor=c, edgecolor="#999999", label=name)
                           for c, name in zip(colors, labels)],
                  loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1,
                  fontsize="small", frameon=False)

    if dense is not None:
        ax = axes[0, 0]
        ax.imshow(dense.numpy(), cmap=ListedColormap(["#ffffff", "#000000"]), vmin=0, vmax=1,
                  interpolation="nearest", extent=(-0.5, kv_len - 0.5, q_len - 0.5, -0.5))
        ax.set_title(f"{pattern.name}: mask (head {head})")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        key(ax, ["#000000"], ["kept (weight = score, no softmax)"])
    cmap = ListedColormap(["#ffffff", "#c6dbef", "#08519c"])
    ax = axes[0, n - 1]
    ax.imshow(m.numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    pooled = f", cells of {fr}×{fc}" if fr > 1 or fc > 1 else ""
    ax.set_title(f"chunked linear algorithm: chunks of {chunk}{pooled}", fontsize="medium")
    ax.set_xlabel("key chunk")
    ax.set_ylabel("query chunk (positions q + d)")
    key(ax, cmap.colors[1:], ("earlier chunk: carried by the running state (not visited)",
                              "diagonal block: computed directly"))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def draw_linear_png(pattern, path: str, q_len: int, kv_len: int, heads: int, chunk: int,
                    decision, head: int = 0) -> None:
    """Write `linear_figure(...)` as a PNG (needs matplotlib)."""
    import matplotlib.pyplot as plt
    fig = linear_figure(pattern, q_len, kv_len, heads, chunk, decision, head=head)
    fig.savefig(path, dpi=100)
    plt.close(fig)
