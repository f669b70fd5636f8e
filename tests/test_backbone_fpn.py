"""ResNet + FPN: shapes, frozen stages, and float64 finite-difference checks of the backward."""

import numpy as np
import pytest

from tinymrcnn.config import MaskRCNNConfig
from tinymrcnn.gradcheck import check_module
from tinymrcnn.model.backbone import ResNet
from tinymrcnn.model.fpn import FPN
from tinymrcnn.model.mask_rcnn import Backbone
from tinymrcnn.nn import Module


def tiny_config(**kw):
    base = dict(
        block="basic",
        blocks_per_stage=(1, 1, 1, 1),
        stem_channels=4,
        stage_channels=(4, 8, 8, 8),
        norm="group",
        group_norm_groups=2,
        fpn_channels=4,
        dtype="float64",
    )
    base.update(kw)
    return MaskRCNNConfig.shapes(**base)


class Flat(Module):
    """Concatenates a list-valued module's outputs so the generic checker can use it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        outs = self.inner(x)
        self.save(x.shape, [o.shape for o in outs])
        return np.concatenate([o.ravel() for o in outs])

    def backward(self, dy):
        x_shape, shapes = self.restore()
        grads, start = [], 0
        for s in shapes:
            n = int(np.prod(s))
            grads.append(dy[start : start + n].reshape(s))
            start += n
        if isinstance(self.inner, ResNet):
            dx = self.inner.backward(grads, need_input_grad=True)
            return np.zeros(x_shape) if dx is None else dx  # frozen stem: no input gradient
        return self.inner.backward(grads)


class BackboneWithInputGrad(Module):
    def __init__(self, config):
        super().__init__()
        self.body = ResNet(config, np.random.default_rng(1))
        self.fpn = FPN(self.body.out_channels, config.fpn_channels, np.random.default_rng(2))

    def forward(self, x):
        return self.fpn(self.body(x))

    def backward(self, grads):
        return self.body.backward(self.fpn.backward(grads), need_input_grad=True)


def _nonzero_init(module, rng):
    # Zero-initialised last norms make residual branches inactive at start;
    # perturb every parameter so each one influences the output.
    for p in module.parameters():
        p.data = p.data + 0.3 * rng.standard_normal(p.data.shape)


def test_shapes_and_strides():
    cfg = MaskRCNNConfig.shapes()
    bb = Backbone(cfg, np.random.default_rng(0))
    x = np.random.default_rng(0).standard_normal((2, 3, 128, 96)).astype(np.float32)
    ps = bb(x)
    assert [p.shape for p in ps] == [(2, 64, 32, 24), (2, 64, 16, 12), (2, 64, 8, 6), (2, 64, 4, 3), (2, 64, 2, 2)]
    assert all(p.dtype == np.float32 for p in ps)


@pytest.mark.parametrize("block,norm", [("basic", "group"), ("bottleneck", "batch")])
def test_backbone_fpn_gradients(block, norm):
    kw = dict(block=block, norm=norm)
    if block == "bottleneck":
        kw.update(stage_channels=(8, 8, 8, 8), stem_channels=4)
    cfg = tiny_config(**kw)
    net = BackboneWithInputGrad(cfg).to_dtype(np.float64)
    rng = np.random.default_rng(3)
    _nonzero_init(net, rng)
    x = rng.standard_normal((2, 3, 64, 32))  # batch 2, non-square
    # On this deep sum a plain centred difference at h=1e-6 is dominated by rounding
    # noise (1e-5 on the image gradient), while h=1e-4 risks crossing a ReLU or
    # max-pool kink. Richardson extrapolation at h=1e-5 removes the h^2 truncation
    # term at a step where the noise is small (worst error measured: 3.5e-7).
    # The difference's resolution is about 1e-16 * sum|f g| / h ~ 6e-8 here, so
    # entries below 1e-4 of the largest gradient entry (e.g. a stem BatchNorm bias
    # whose shift the next BatchNorm removes: exactly 0) are compared in absolute terms.
    errs = check_module(Flat(net), [x], h=1e-5, max_checks=6, seed=4, scale_floor=1e-4, richardson=True)
    params = {n for n, p in net.named_parameters()}
    assert {k[len("inner.") :] for k in errs if k.startswith("inner.")} == params
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-6, (worst, errs[worst])


def test_frozen_stages_get_no_gradient_and_backward_stops():
    cfg = tiny_config(norm="frozen_bn", frozen_stages=2)
    net = ResNet(cfg, np.random.default_rng(0)).to_dtype(np.float64)
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64))
    outs = net(x)
    assert net.conv1._caches == [] and net.layer1[0].conv1._caches == []  # frozen: no cache kept
    dx = net.backward([np.ones_like(o) for o in outs], need_input_grad=True)
    assert dx is None  # nothing below needs it
    for name, p in net.named_parameters():
        frozen = name.startswith(("conv1", "bn1", "layer1"))
        assert p.requires_grad == (not frozen)
        if frozen:
            assert not p.grad.any(), name
    assert net.layer2[0].conv1.weight.grad.any()
    # The trainable part passes a finite-difference check.
    errs = check_module(Flat(net), [x], h=1e-5, max_checks=5, seed=2, scale_floor=1e-4, richardson=True)
    assert max(errs[k] for k in errs if k != "input0") < 1e-6


def test_fpn_backward_sums_top_down_and_p6():
    rng = np.random.default_rng(0)
    fpn = FPN((3, 4, 5, 6), 2, rng).to_dtype(np.float64)
    _nonzero_init(fpn, rng)
    feats = [rng.standard_normal((1, c, s, s + 1)) for c, s in zip((3, 4, 5, 6), (9, 5, 3, 2))]

    class F(Module):
        def __init__(self):
            super().__init__()
            self.fpn = fpn

        def forward(self, *cs):
            outs = self.fpn(list(cs))
            self.save([o.shape for o in outs])
            return np.concatenate([o.ravel() for o in outs])

        def backward(self, dy):
            (shapes,) = self.restore()
            grads, start = [], 0
            for s in shapes:
                n = int(np.prod(s))
                grads.append(dy[start : start + n].reshape(s))
                start += n
            return tuple(self.fpn.backward(grads))

    errs = check_module(F(), feats, max_checks=20)
    assert max(errs.values()) < 1e-6, errs


def test_backward_without_image_gradient_skips_only_the_image():
    cfg = tiny_config()
    grads = {}
    for need in (True, False):
        net = ResNet(cfg, np.random.default_rng(0))
        x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
        outs = net(x)
        dx = net.backward([np.ones_like(o) for o in outs], need_input_grad=need)
        assert (dx is None) == (not need)
        grads[need] = {n: p.grad.copy() for n, p in net.named_parameters()}
    assert grads[False]["conv1.weight"].any()
    for name, g in grads[True].items():
        np.testing.assert_allclose(grads[False][name], g, rtol=1e-6, atol=1e-7, err_msg=name)
