"""Layers with hand-derived backward passes (see module.py for the protocol)."""

from .activation import ReLU, Sigmoid
from .conv import Conv2d, ConvTranspose2d
from .linear import Flatten, Linear
from .module import Module, Parameter, Sequential
from .norm import BatchNorm2d, FrozenBatchNorm2d, GroupNorm
from .pooling import MaxPool2d
from .upsample import UpsampleNearest, upsample_nearest, upsample_nearest_backward
