"""The RoI pooling vs RoIAlign example of docs/walkthrough.md, computed and drawn."""

import numpy as np
import pytest

from tinymrcnn.ops.roi_align import roi_sample_points
from tinymrcnn.ops.roi_pool import roi_pool_cells
from tinymrcnn.viz.roi import (
    BLOG_BOX,
    blog_roi_numbers,
    blog_sample_points,
    draw_roi_pool,
    kernel_roi_numbers,
    roi_pool_vs_align_figure,
)


def test_the_worked_examples_numbers():
    nb = blog_roi_numbers()  # 145 x 200 RoI, stride 32, 3 x 3 output
    assert nb["roi_size"] == (145, 200)
    assert round(nb["projected"][0], 2) == 4.53 and nb["projected"][1] == 6.25
    assert nb["cells"] == (4, 6)  # first quantisation
    assert nb["bin_stride"] == (1, 2)  # second: floor(4/3) x floor(6/3)
    r0, c0 = nb["origin"]
    # the 4th row of the 4 x 6 region is never pooled (the figure's sky-blue row)
    assert nb["never_read"] == [(r0 + 3, c0 + j) for j in range(6)]
    assert len(nb["pooled"]) == 3 * 6
    np.testing.assert_allclose(nb["align_bin"], (1.51, 2.08), atol=0.005)
    np.testing.assert_allclose(nb["lost"], (0.53, 0.25), atol=0.005)


def test_thirds_and_implementation_points_differ():
    ys_blog, xs_blog = blog_sample_points()
    ys_code, xs_code, count = roi_sample_points(BLOG_BOX, 3, 1 / 32, 2, aligned=True)
    bin_h = 145 / 32 / 3
    np.testing.assert_allclose(ys_blog[0] - 64 / 32, [bin_h / 3, 2 * bin_h / 3])  # thirds
    np.testing.assert_allclose(ys_code[0] + 0.5 - 64 / 32, [bin_h / 4, 3 * bin_h / 4])  # (i+.5)/2
    assert count == 4


def test_figure_renders(tmp_path):
    pytest.importorskip("matplotlib")
    fig = roi_pool_vs_align_figure()
    assert len(fig.axes) == 4
    out = tmp_path / "roi.png"
    fig.savefig(out, dpi=60)
    assert out.stat().st_size > 10_000


def _drawn_bins(ax):
    """The black outlines of the RoI pooling panel: (h0, h1, w0, w1) of each bin."""
    from matplotlib.colors import to_rgba

    return sorted(
        (round(p.get_y()), round(p.get_y() + p.get_height()), round(p.get_x()), round(p.get_x() + p.get_width()))
        for p in ax.patches
        if not p.get_fill() and p.get_edgecolor() == to_rgba("black")
    )


def test_seven_by_seven_draws_the_kernels_bins():
    """7 bins on 4 x 6 whole cells: the floor picture has no bins; the panel draws the kernel's."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    assert blog_roi_numbers(output_size=7)["bin_stride"] == (0, 0)
    ax = Figure().subplots()
    assert draw_roi_pool(ax, BLOG_BOX, 32, 7, 16) == "kernel"
    cells = roi_pool_cells(BLOG_BOX, 7, 1 / 32, 16, 16)
    assert _drawn_bins(ax) == sorted(b for row in cells for b in row)
    kn = kernel_roi_numbers(BLOG_BOX, 32, 7, 16)
    assert kn["region"] == (2, 8, 2, 9) and kn["never_read"] == []  # rows 2..7, columns 2..8, all read
    assert "0 x 0" not in ax.get_title() and "never pooled (0 cells)" in [t.get_text() for t in ax.get_legend().texts]


def test_floor_picture_when_bins_are_whole_cells():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    assert draw_roi_pool(ax) == "floor"  # the worked example: 3 x 3 bins of 1 x 2 cells
    assert _drawn_bins(ax) == sorted((2 + i, 3 + i, 2 + 2 * j, 4 + 2 * j) for i in range(3) for j in range(3))
    # a 70 x 90 box at stride 4 pooled to 7 x 7: 17 x 22 whole cells, bins of 2 x 3, 3 rows + 1 column unread
    nb = blog_roi_numbers((64, 64, 154, 134), 4, 7)
    assert nb["cells"] == (17, 22) and nb["bin_stride"] == (2, 3) and len(nb["never_read"]) == 3 * 22 + 14
    with pytest.raises(ValueError, match="rounding"):
        draw_roi_pool(Figure().subplots(), rounding="round")


@pytest.mark.parametrize("box, stride, output, size", [(BLOG_BOX, 32, 7, 16), ((64, 64, 154, 134), 4, 7, 128)])
def test_figure_renders_for_other_parameters(box, stride, output, size, tmp_path):
    pytest.importorskip("matplotlib")
    fig = roi_pool_vs_align_figure(box, stride, output, size)
    fig.savefig(tmp_path / "roi.png", dpi=40)
    assert f"{output} x {output} output" in fig._suptitle.get_text()
