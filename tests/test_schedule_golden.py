"""Golden text tile maps (`str(schedule)`) and closed-form bounds of library specs, plus
the PNG picture and downsampling of large maps."""
import pytest
import torch

import attncc
from attncc.runtime.options import CompileOptions
from attncc.schedule.build import build_schedule, schedule_text
from attncc.schedule.draw import downsample, draw_png

B16 = CompileOptions(block_m=16, block_n=16)

CASES = {
    "causal_256": ("causal", {}, 256, 256, B16),
    "sliding_window_256": ("sliding_window", {"window": 64}, 256, 256, B16),
    "streaming_sinks_200x240": ("streaming_sinks", {"sinks": 8, "window": 40}, 200, 240, B16),
    "natten2d_16x16_tiles_4x4": ("natten2d", {"height": 16, "width": 16, "kernel": 5}, None, None,
                                 CompileOptions(block_m=16, block_n=16, q_tile=(4, 4), kv_tile=(4, 4))),
    "dilated_1d_128": ("dilated_1d", {"width": 24, "dilation": 4}, 128, 128, B16),
    "document_128": ("document", {}, 128, 128, B16),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tile_map_golden(name, golden):
    spec, params, lq, lk, opts = CASES[name]
    p = attncc.load(f"specs/{spec}.attn", **params)
    s = build_schedule(p, lq, lk, options=opts)
    text = str(s)
    assert text == schedule_text(p, lq, lk, options=opts)
    bounds = s.classes[0].bounds
    if bounds is not None:
        text += "bounds:\n" + str(bounds) + "\n"
    golden(f"schedule/{name}.txt", text)


def test_density_is_exact():
    p = attncc.load("specs/sliding_window.attn", window=64)
    s = build_schedule(p, 256, 200, options=B16)
    assert s.density() == int(p.dense_mask(256, 200)[0, 0].sum()) / (256 * 200)


def test_large_maps_are_downsampled():
    p = attncc.load("specs/causal.attn")
    s = build_schedule(p, 4096, 4096, options=B16)
    lines = str(s).splitlines()
    assert "downsampled: each cell is 4×3 tiles" in lines[1]
    assert len(lines) == 2 + 64 + 1  # header, class line, 64 rows, key
    m = torch.tensor([[2, 2, 0], [2, 1, 0]], dtype=torch.int8)
    cells, fr, fc = downsample(m, 1, 2)
    assert (fr, fc) == (2, 2) and cells.tolist() == [[1, 0]]


def test_draw_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the PNG view needs the optional matplotlib")
    p = attncc.load("specs/natten2d.attn", height=16, width=16, kernel=5)
    path = tmp_path / "tiles.png"
    draw_png(build_schedule(p), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
