"""Where does the time go? A small stage timer the model reports to.

    timer = StageTimer()
    model.set_timer(timer)
    model.forward_train(images, targets); model.backward()
    print(timer.table())

With no timer set (the default) the stages run untimed at no cost.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext


class StageTimer:
    """Accumulates wall-clock seconds per named stage, in first-seen order."""

    def __init__(self):
        self.seconds: "OrderedDict[str, float]" = OrderedDict()
        self.calls: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def table(self, repeats: int = 1) -> str:
        total = sum(self.seconds.values())
        lines = [f"{'stage':28s} {'ms':>9s} {'share':>7s}"]
        for name, s in self.seconds.items():
            lines.append(f"{name:28s} {1000 * s / repeats:9.1f} {100 * s / max(total, 1e-12):6.1f}%")
        lines.append(f"{'total':28s} {1000 * total / repeats:9.1f}")
        return "\n".join(lines)


def timed(timer: StageTimer | None, name: str):
    """``with timed(self.timer, "rpn.head"):`` -- a no-op when no timer is set."""
    return nullcontext() if timer is None else timer.stage(name)
