"""ResNet backbone: image -> C2, C3, C4, C5 (strides 4, 8, 16, 32).

docs/walkthrough.md#2-backbone-and-fpn and docs/semantics.md#backbone-and-fpn.
The layout follows torchvision's
ResNet so parameter names line up (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` ...):

    stem:   conv 7x7/2 (stem_channels) -> norm -> ReLU -> maxpool 3x3/2   stride 4
    layer1: blocks at stride 1 -> C2                                       stride 4
    layer2: first block has stride 2 -> C3                                 stride 8
    layer3: -> C4                                                          stride 16
    layer4: -> C5                                                          stride 32

Backward of a residual block: the block computes ``relu(F(x) + S(x))`` where
S is the identity or the 1x1 downsample projection, so the gradient after the
final ReLU goes *both* ways and the two input gradients add:
``dx = dF/dx^T g + dS/dx^T g``.
"""

from __future__ import annotations

import numpy as np

from ..nn import BatchNorm2d, Conv2d, FrozenBatchNorm2d, GroupNorm, MaxPool2d, Module, ReLU, Sequential


def make_norm(kind: str, channels: int, groups: int = 32) -> Module:
    """The normalization layer after each conv.

    ``group``: GroupNorm with at most ``groups`` groups and at least 4
    channels per group (small toy widths would otherwise get 1-channel
    groups, which is InstanceNorm). ``batch``: BatchNorm2d in training mode.
    ``frozen_bn``: an affine map with fixed statistics (pretrained weights).
    """
    if kind == "group":
        g = max(1, min(groups, channels // 4))
        while channels % g:
            g -= 1
        return GroupNorm(g, channels)
    if kind == "batch":
        return BatchNorm2d(channels)
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    raise ValueError(f"unknown norm {kind!r}")


class BasicBlock(Module):
    """Two 3x3 convs (ResNet-18/34). ``expansion`` = 1."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, groups: int, rng):
        super().__init__()
        self.conv1 = Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False, rng=rng)
        self.bn1 = make_norm(norm, out_ch, groups)
        self.relu1 = ReLU()
        self.conv2 = Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False, rng=rng)
        self.bn2 = make_norm(norm, out_ch, groups)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = Sequential(
                Conv2d(in_ch, out_ch, 1, stride=stride, bias=False, rng=rng), make_norm(norm, out_ch, groups)
            )
        self.relu_out = ReLU()

    def forward(self, x):  # x (N, Cin, H, W)
        out = self.relu1(self.bn1(self.conv1(x)))  # (N, C, H/s, W/s)
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu_out(out + identity)

    def backward(self, dy):
        g = self.relu_out.backward(dy)  # gradient of the residual sum
        d = self.conv2.backward(self.bn2.backward(g))
        d_main = self.conv1.backward(self.bn1.backward(self.relu1.backward(d)))
        d_skip = g if self.downsample is None else self.downsample.backward(g)
        return d_main + d_skip

    @property
    def last_norm(self):
        return self.bn2


class Bottleneck(Module):
    """1x1 reduce -> 3x3 (carries the stride, as torchvision) -> 1x1 expand (x4)."""

    expansion = 4

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, groups: int, rng):
        super().__init__()
        width = out_ch // self.expansion
        self.conv1 = Conv2d(in_ch, width, 1, bias=False, rng=rng)
        self.bn1 = make_norm(norm, width, groups)
        self.relu1 = ReLU()
        self.conv2 = Conv2d(width, width, 3, stride=stride, padding=1, bias=False, rng=rng)
        self.bn2 = make_norm(norm, width, groups)
        self.relu2 = ReLU()
        self.conv3 = Conv2d(width, out_ch, 1, bias=False, rng=rng)
        self.bn3 = make_norm(norm, out_ch, groups)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = Sequential(
                Conv2d(in_ch, out_ch, 1, stride=stride, bias=False, rng=rng), make_norm(norm, out_ch, groups)
            )
        self.relu_out = ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu_out(out + identity)

    def backward(self, dy):
        g = self.relu_out.backward(dy)
        d = self.conv3.backward(self.bn3.backward(g))
        d = self.conv2.backward(self.bn2.backward(self.relu2.backward(d)))
        d_main = self.conv1.backward(self.bn1.backward(self.relu1.backward(d)))
        d_skip = g if self.downsample is None else self.downsample.backward(g)
        return d_main + d_skip

    @property
    def last_norm(self):
        return self.bn3


class ResNet(Module):
    """The body: returns [C2, C3, C4, C5].

    Frozen stages (``frozen_stages`` = k: the stem and layer1..layer{k-1}, as
    torchvision's ``trainable_layers``) get no gradient; their forward keeps
    no cache and the backward stops above them, since nothing below needs a
    gradient.
    """

    def __init__(self, config, rng=None):
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        c = config
        block = BasicBlock if c.block == "basic" else Bottleneck
        self.conv1 = Conv2d(3, c.stem_channels, 7, stride=2, padding=3, bias=False, rng=rng)
        self.bn1 = make_norm(c.norm, c.stem_channels, c.group_norm_groups)
        self.relu = ReLU()
        self.maxpool = MaxPool2d(3, stride=2, padding=1) if c.stem_maxpool else None
        in_ch = c.stem_channels
        for i, (n_blocks, out_ch) in enumerate(zip(c.blocks_per_stage, c.stage_channels)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_ch, out_ch, stride if j == 0 else 1, c.norm, c.group_norm_groups, rng))
                in_ch = out_ch
            setattr(self, f"layer{i + 1}", Sequential(*blocks))
        self.frozen_stages = c.frozen_stages
        self.out_channels = tuple(c.stage_channels)
        self._init_weights(rng)
        for stage in self._stages()[: self.frozen_stages]:
            for m in stage:
                m.freeze()
        self.train()

    def _init_weights(self, rng) -> None:
        # Kaiming-normal (fan_out, ReLU) for convs as torchvision's ResNet; the
        # last norm of each residual branch starts at zero, so every block starts
        # as the identity and a from-scratch net trains stably (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, Conv2d):
                o, _, kh, kw = m.weight.data.shape
                std = np.sqrt(2.0 / (o * kh * kw))
                m.weight.data = (rng.standard_normal(m.weight.data.shape) * std).astype(m.weight.data.dtype)
            if isinstance(m, (BasicBlock, Bottleneck)) and isinstance(m.last_norm, (GroupNorm, BatchNorm2d)):
                m.last_norm.weight.data[...] = 0.0

    def _stages(self) -> list[list[Module]]:
        """[stem modules], layer1, ..., layer4 -- the units that can be frozen."""
        stem = [m for m in (self.conv1, self.bn1, self.relu, self.maxpool) if m is not None]
        return [stem] + [[getattr(self, f"layer{i}")] for i in range(1, 5)]

    def train(self, mode: bool = True):
        super().train(mode)
        for stage in self._stages()[: self.frozen_stages]:
            for m in stage:
                m.eval()  # frozen: no caches, no statistics updates
        return self

    def forward(self, x):  # x (N, 3, H, W)
        feats = []
        for i, stage in enumerate(self._stages()):
            for m in stage:
                x = m(x)
            if i > 0:
                feats.append(x)  # C2..C5
        return feats

    def backward(self, grads, need_input_grad: bool = False):
        """grads: [dC2, dC3, dC4, dC5] (None for a level that got no gradient).

        Returns the gradient of the image when ``need_input_grad`` and nothing is
        frozen, else None.
        """
        stages = self._stages()
        lowest_trainable = self.frozen_stages
        d = None
        for i in range(len(stages) - 1, lowest_trainable - 1, -1):
            if i > 0 and grads[i - 1] is not None:
                d = grads[i - 1] if d is None else d + grads[i - 1]
            if d is None:
                continue
            for m in reversed(stages[i]):
                if m is self.conv1 and not need_input_grad:
                    m.backward(d, need_input_grad=False)  # the image's gradient: not made at all
                    return None
                d = m.backward(d)
        return d if (need_input_grad and lowest_trainable == 0) else None
