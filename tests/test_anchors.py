"""Anchors: base anchors, grid shifts and (H, W, A) order against hand-computed values."""

import numpy as np
import pytest

from tinymrcnn.model.anchors import AnchorGenerator


def test_default_base_anchors_are_torchvisions():
    # h = s sqrt(r), w = s / sqrt(r); for s = 32: r = 0.5 -> w = 45.25, h = 22.63 -> halves 22.6, 11.3
    expected = {
        32: [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]],
        64: [[-45, -23, 45, 23], [-32, -32, 32, 32], [-23, -45, 23, 45]],
        128: [[-91, -45, 91, 45], [-64, -64, 64, 64], [-45, -91, 45, 91]],
        256: [[-181, -91, 181, 91], [-128, -128, 128, 128], [-91, -181, 91, 181]],
        512: [[-362, -181, 362, 181], [-256, -256, 256, 256], [-181, -362, 181, 362]],
    }
    gen = AnchorGenerator()
    assert gen.num_anchors_per_location() == [3] * 5
    for cell, size in zip(gen.cell_anchors, expected):
        assert cell.dtype == np.float32
        np.testing.assert_array_equal(cell, expected[size])


def test_rounding_is_half_to_even_and_order_is_ratio_major():
    # halves of 1, 3, 5 are 0.5, 1.5, 2.5 -> 0, 2, 2 (torch.round rounds half to even)
    base = AnchorGenerator.base_anchors((1, 3, 5), (1.0,))
    np.testing.assert_array_equal(base[:, 2], [0, 2, 2])
    base = AnchorGenerator.base_anchors((32, 64), (0.25, 1.0))
    # a = ratio_index * num_sizes + size_index: (r=0.25, 32), (0.25, 64), (1, 32), (1, 64)
    np.testing.assert_array_equal(base, [[-32, -8, 32, 8], [-64, -16, 64, 16], [-16, -16, 16, 16], [-32, -32, 32, 32]])


def test_anchors_for_a_known_image_size():
    # A 64 x 96 image; one level with a 2 x 3 grid -> stride 32 in both directions.
    gen = AnchorGenerator(sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),))
    (anchors,) = gen.anchors_per_level((64, 96), [(2, 3)])
    base = np.array([[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]], np.float32)
    expected = []
    for i in range(2):  # rows (y) outermost, then columns (x), then the 3 anchors
        for j in range(3):
            expected.extend(base + [32 * j, 32 * i, 32 * j, 32 * i])
    assert anchors.shape == (18, 4) and anchors.dtype == np.float32
    np.testing.assert_array_equal(anchors, expected)
    np.testing.assert_array_equal(anchors[3 * (1 * 3 + 2) + 1], [64 - 16, 32 - 16, 64 + 16, 32 + 16])

    (centred,) = AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),), cell_centered=True).anchors_per_level((64, 96), [(2, 3)])
    np.testing.assert_array_equal(centred, np.asarray(expected) + 16)


def test_strides_use_floor_division_of_the_padded_size_per_axis():
    gen = AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=((1.0,), (1.0,)))
    assert gen.strides((100, 64), [(13, 16), (7, 8)]) == [(7, 4), (14, 8)]
    a0, a1 = gen.anchors_per_level((100, 64), [(13, 16), (7, 8)], dtype=np.float64)
    assert a0.shape == (13 * 16, 4) and a1.shape == (7 * 8, 4) and a0.dtype == np.float64
    centres = (a0[:, :2] + a0[:, 2:]) / 2
    np.testing.assert_array_equal(centres.reshape(13, 16, 2)[12, 15], [15 * 4, 12 * 7])


def test_full_pyramid_counts():
    gen = AnchorGenerator()
    shapes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    anchors = gen.anchors_per_level((800, 1216), shapes)
    assert [a.shape[0] for a in anchors] == [h * w * 3 for h, w in shapes]
    assert gen.strides((800, 1216), shapes) == [(4, 4), (8, 8), (16, 16), (32, 32), (61, 64)]


@pytest.mark.parametrize(
    "call",
    [
        lambda g: g.anchors_per_level((16, 16), [(4, 4), (2, 2), (1, 1), (0, 0), (0, 0)]),  # image < stride
        lambda g: g.anchors_per_level((64, 64), [(16, 16)]),  # too few levels
        lambda g: g.anchors_per_level((8, 8), [(16, 16)] * 5),  # grid > image
        lambda g: g.anchors_per_level((64,), [(16, 16)] * 5),
    ],
)
def test_bad_input(call):
    with pytest.raises(ValueError):
        call(AnchorGenerator())


def test_bad_config():
    with pytest.raises(ValueError):
        AnchorGenerator(sizes=((32,),), aspect_ratios=((1.0,), (2.0,)))
    with pytest.raises(ValueError):
        AnchorGenerator(sizes=((0,),), aspect_ratios=((1.0,),))


def test_config_with_several_sizes_per_level():
    """anchor_sizes entries may be tuples: the RPN then scores sizes x ratios anchors per cell."""
    from tinymrcnn import MaskRCNN, MaskRCNNConfig

    sizes = ((24, 34), (48, 68), (96, 136), (192, 272), (384, 543))
    cfg = MaskRCNNConfig.shapes(anchor_sizes=sizes)
    assert cfg.num_anchors_per_location == 6
    assert MaskRCNNConfig.from_json(cfg.to_json()) == cfg  # nested JSON arrays come back as tuples
    rpn = MaskRCNN(cfg).rpn
    assert rpn.anchor_generator.num_anchors_per_location() == [6] * 5
    assert rpn.head.cls_logits.weight.shape[0] == 6 and rpn.head.bbox_pred.weight.shape[0] == 24
    # level P3 (stride 8), size 68, ratio 1 (a = 1 * 2 + 1), at the origin cell
    np.testing.assert_array_equal(rpn.anchor_generator.cell_anchors[1][3], [-34, -34, 34, 34])
    # a plain number per level is one size
    assert MaskRCNNConfig.shapes(anchor_sizes=(16, 32, 64, 128, 256)).anchor_sizes_per_level == (
        (16,),
        (32,),
        (64,),
        (128,),
        (256,),
    )
    with pytest.raises(ValueError, match="anchor_sizes"):
        MaskRCNNConfig.shapes(anchor_sizes=((24, 34), 48, 96, 192, 384))  # the RPN head is shared
    with pytest.raises(ValueError, match="anchor_sizes"):
        MaskRCNNConfig.shapes(anchor_sizes=(24, 48, 96, 192, -1))
    with pytest.raises(ValueError, match="anchor_sizes"):
        MaskRCNNConfig.shapes(anchor_sizes=("24", 48, 96, 192, 384))  # a clear error, not a TypeError


@pytest.mark.torch
def test_matches_torchvision_anchor_code_in_torch():
    """torchvision's AnchorGenerator.generate_anchors + grid_anchors, repeated in torch."""
    torch = pytest.importorskip("torch")
    sizes, ratios = (24, 48, 96), (0.5, 1.0, 2.0, 3.0)
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ar = torch.as_tensor(ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ar)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
    gh, gw, H, W = 5, 7, 83, 120
    sh, sw = H // gh, W // gw
    shift_y, shift_x = torch.meshgrid(
        torch.arange(gh, dtype=torch.int32) * sh, torch.arange(gw, dtype=torch.int32) * sw, indexing="ij"
    )
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    expected = (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)
    (ours,) = AnchorGenerator((sizes,), (ratios,)).anchors_per_level((H, W), [(gh, gw)])
    np.testing.assert_array_equal(ours, expected.numpy())
