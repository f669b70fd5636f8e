"""Layers with hand-derived backward passes (see module.py for the protocol)."""
from .module import Module, Parameter, Sequential
