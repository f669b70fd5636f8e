"""Backbone + FPN forward+backward: tinymrcnn vs torch (same weights, same run).

    python benchmarks/bench_backbone.py [--repeats 3]

Layouts: the shapes preset's toy backbone (GroupNorm, 32..256 channels, FPN 64)
and a ResNet-18 layout (BatchNorm in training mode, 64..512, FPN 256), at
128x128 and 512x512, batch 2. The torch baseline runs the same computation
with torch.nn.functional and autograd, from tinymrcnn's own weights.
"""

import argparse
import time

import numpy as np

try:  # torch before tinymrcnn: it then keeps its own OpenMP runtime and wait policy
    import torch  # noqa: F401  (tinymrcnn/kernels/cpu/__init__.py)
except ImportError:
    pass

from tinymrcnn import MaskRCNNConfig
from tinymrcnn.model.mask_rcnn import Backbone


def layouts():
    toy = MaskRCNNConfig.shapes()
    r18 = MaskRCNNConfig.shapes(
        blocks_per_stage=(2, 2, 2, 2),
        stem_channels=64,
        stage_channels=(64, 128, 256, 512),
        norm="batch",
        fpn_channels=256,
    )
    return {"toy (GN, 32-256, FPN 64)": toy, "R18 (BN, 64-512, FPN 256)": r18}


def torch_forward(torch, sd, cfg, x):
    """The same backbone + FPN with torch.nn.functional; returns [P2..P6]."""
    F = torch.nn.functional

    def norm(prefix, t):
        if cfg.norm == "group":
            g = sd[prefix + ".weight"].shape[0]
            from tinymrcnn.model.backbone import make_norm

            groups = make_norm("group", g, cfg.group_norm_groups).num_groups
            return F.group_norm(t, groups, sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)
        return F.batch_norm(t, None, None, sd[prefix + ".weight"], sd[prefix + ".bias"], training=True)

    def block(p, t, stride):
        out = F.relu(norm(p + ".bn1", F.conv2d(t, sd[p + ".conv1.weight"], stride=stride, padding=1)))
        out = norm(p + ".bn2", F.conv2d(out, sd[p + ".conv2.weight"], padding=1))
        if p + ".downsample.0.weight" in sd:
            t = norm(p + ".downsample.1", F.conv2d(t, sd[p + ".downsample.0.weight"], stride=stride))
        return F.relu(out + t)

    b = "body."
    t = F.relu(norm(b + "bn1", F.conv2d(x, sd[b + "conv1.weight"], stride=2, padding=3)))
    t = F.max_pool2d(t, 3, 2, 1)
    cs = []
    for i, n in enumerate(cfg.blocks_per_stage):
        for j in range(n):
            t = block(f"{b}layer{i + 1}.{j}", t, 2 if (i > 0 and j == 0) else 1)
        cs.append(t)
    f = "fpn."
    last = F.conv2d(cs[-1], sd[f + "inner_blocks.3.weight"], sd[f + "inner_blocks.3.bias"])
    outs = [F.conv2d(last, sd[f + "layer_blocks.3.weight"], sd[f + "layer_blocks.3.bias"], padding=1)]
    for k in (2, 1, 0):
        lat = F.conv2d(cs[k], sd[f"{f}inner_blocks.{k}.weight"], sd[f"{f}inner_blocks.{k}.bias"])
        last = lat + F.interpolate(last, size=lat.shape[-2:], mode="nearest")
        outs.insert(0, F.conv2d(last, sd[f"{f}layer_blocks.{k}.weight"], sd[f"{f}layer_blocks.{k}.bias"], padding=1))
    return outs + [outs[-1][:, :, ::2, ::2]]


def best(fn, repeats):
    fn()  # warm-up (compiles Numba kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print(f"{'layout':28s} {'size':>8s} {'tinymrcnn ms':>13s} {'torch ms':>9s} {'torch/tiny':>10s}")
    for name, cfg in layouts().items():
        bb = Backbone(cfg, np.random.default_rng(0))
        for size in (128, 512):
            x = rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)

            def ours():
                bb.clear_cache()
                ps = bb(x)
                bb.backward([np.ones_like(p) for p in ps])

            t_ours = best(ours, args.repeats)
            t_torch = float("nan")
            if torch is not None:
                sd = {
                    k: torch.tensor(v, requires_grad=k.endswith(("weight", "bias"))) for k, v in bb.state_dict().items()
                }
                xt = torch.tensor(x)

                def theirs():
                    ps = torch_forward(torch, sd, cfg, xt)
                    sum(p.sum() for p in ps).backward()

                t_torch = best(theirs, args.repeats)
            print(f"{name:28s} {size:>5d}px {1000 * t_ours:13.1f} {1000 * t_torch:9.1f} {t_torch / t_ours:10.2f}")
    if torch is None:
        print("torch is not installed: no baseline column (pip install torch==2.13.0)")


if __name__ == "__main__":
    main()
