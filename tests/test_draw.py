"""Tile pictures: the text map's key, max (not mean) downsampling that keeps thin structure
visible, and the PNG's colour keys and integer ticks."""
import pytest
import torch

import attncc
from attncc.runtime.options import CompileOptions
from attncc.schedule.build import build_schedule
from attncc.schedule.draw import KEY, downsample, pool_any

B64 = CompileOptions(block_m=64, block_n=64)


def sinks_1024():
    return build_schedule(attncc.load("specs/streaming_sinks.attn", sinks=4, window=256), 1024,
                          1024, options=B64)


def test_text_map_ends_with_its_key():
    text = str(sinks_1024())
    assert text.splitlines()[-1] == KEY
    for glyph, word in (("█", "FULL"), ("▒", "PARTIAL"), ("·", "EMPTY")):
        assert f"{glyph} {word}" in KEY


def test_pooling_keeps_four_sink_columns_visible():
    mask = attncc.load("specs/streaming_sinks.attn", sinks=4, window=256).dense_mask(1024, 1024)[0, 0]
    cells, fr, fc = pool_any(mask, 200)
    assert (fr, fc) == (6, 6) and cells.shape == (171, 171)
    assert bool(cells[:, 0].all())            # every row of cells shows the sink column
    mean = torch.nn.functional.avg_pool2d(mask.float()[None, None, :1020, :1020], 6)[0, 0]
    assert float(mean[-1, 0]) < 0.7           # a mean would draw them grey, fading
    assert not bool(cells[-1, 1:100].any())   # and keeps what is masked white
    # an exact independent formula: cell (i, j) is kept iff any pair in its block is
    for i, j in ((0, 0), (100, 3), (170, 170), (50, 120)):
        assert bool(cells[i, j]) == bool(mask[6 * i:6 * i + 6, 6 * j:6 * j + 6].any())


def test_tile_downsampling_is_all_or_partial():
    m = torch.tensor([[2, 2, 0, 0], [2, 2, 0, 1]], dtype=torch.int8)
    cells, fr, fc = downsample(m, 1, 2)
    assert (fr, fc) == (2, 2) and cells.tolist() == [[2, 1]]


def test_png_has_colour_keys_and_integer_ticks(tmp_path):
    pytest.importorskip("matplotlib", reason="the PNG view needs the optional matplotlib")
    import matplotlib.pyplot as plt
    from attncc.schedule.draw import draw_png, figure
    p = attncc.load("specs/natten2d.attn", height=8, width=8, kernel=3)
    fig = figure(build_schedule(p, options=CompileOptions(block_m=16, block_n=16, tile_1d=True)))
    mask_ax, tile_ax = fig.axes
    assert [t.get_text() for t in mask_ax.get_legend().get_texts()] == ["kept", "masked"]
    assert [t.get_text() for t in tile_ax.get_legend().get_texts()] == [
        "EMPTY (skipped)", "PARTIAL (masked)", "FULL (no mask code)"]
    assert list(tile_ax.get_xticks()) == [0, 1, 2, 3] == list(tile_ax.get_yticks())
    fig.canvas.draw()
    for ax in (mask_ax, tile_ax):
        for tick in list(ax.get_xticks()) + list(ax.get_yticks()):
            assert float(tick).is_integer()
    plt.close(fig)
    path = tmp_path / "tiles.png"
    draw_png(build_schedule(p), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
