"""The RoI pooling vs RoIAlign example of docs/walkthrough.md, computed and drawn."""

import numpy as np
import pytest

from tinymrcnn.ops.roi_align import roi_sample_points
from tinymrcnn.viz.roi import BLOG_BOX, blog_roi_numbers, blog_sample_points, roi_pool_vs_align_figure


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
