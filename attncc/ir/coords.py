"""Lower layout coordinates to flat-index arithmetic.

Pre: an IR expression whose `Coord(side, axis)` leaves refer to `layout.axes[axis]`.
Post: an equal-valued expression without `Coord` leaves, for backends that only see flat
token indices. With row-major flattening (last axis fastest) coordinate `axis` of flat index
`i` is `(i // stride) % size`; the `// 1` of the last axis is dropped. The `% size` of the
first axis is kept, so the rewrite is exact for every index, including padded tails beyond
the grid.
"""
from __future__ import annotations

from .nodes import Binary, Const, Coord, Expr, Var, transform
from .segmented import coord_terms


class LayoutError(ValueError):
    """A coordinate does not exist in the layout (or there is no layout)."""


def lower_coords(expr: Expr, layout) -> Expr:
    """`expr` with every `Coord` replaced by `((side - start) // stride) % size` from `layout`
    (an `attncc.ir.pattern.Layout`, a segmented `attncc.ir.segmented.Segmented`, or None when
    the pattern has none); `- start` only for a grid that does not start at token 0."""

    def rewrite(node: Expr):
        if not isinstance(node, Coord):
            return None
        if layout is None:
            raise LayoutError(f"coordinate {node.side}.{node.name} used, but there is no layout")
        terms = coord_terms(layout, node.side, node.axis)
        if terms is None:
            raise LayoutError(f"coordinate {node.side}.{node.name}: axis {node.axis} is not in "
                              f"layout {layout}")
        start, stride, size = terms
        flat: Expr = Var(node.side)
        if start:
            flat = Binary("sub", flat, Const(start))
        if stride != 1:
            flat = Binary("floordiv", flat, Const(stride))
        return Binary("mod", flat, Const(size))

    return transform(expr, rewrite)


def flat_layout(pattern):
    """`pattern` with the coordinates of a segmented layout (`attncc.ir.segmented`) lowered to
    flat-index arithmetic and no layout: the same mask, score and output scale at every
    token pair, for paths that see one flat token sequence (decode). Other patterns are
    returned as they are."""
    import dataclasses

    from .segmented import Segmented
    layout = pattern.layout
    if not isinstance(layout, Segmented):
        return pattern

    def go(e):
        return None if e is None else lower_coords(e, layout)
    return dataclasses.replace(pattern, layout=None, mask=go(pattern.mask),
                               score=go(pattern.score), output_scale=go(pattern.output_scale))
