"""GPU benchmark: the numba.cuda conv2d and roi_align against cuDNN and torchvision, and the model.

    python benchmarks/bench_cuda.py [--repeats 20] [--model-repeats 5] [--no-cpu-check] [--no-model]
                                    [--r50] [--stages] [--smoke]

On a machine with an NVIDIA GPU and numba-cuda (pip install "tinymrcnn[cuda]"):
1. checks the GPU kernels on full-size inputs against tinymrcnn's CPU ops
   (where tinymrcnn.ops has them) and against torch (cuDNN, torchvision),
2. times, in one run, forward + backward of
   - conv2d 3x3 pad 1 at (1,256,64,64)->256 and (8,64,128,128)->64 against
     torch.nn.functional.conv2d on cuDNN in float32 (TF32 off for both
     cuDNN and matmul, so fp32 runs against fp32; cudnn.benchmark on, so
     cuDNN uses its fastest algorithm),
   - roi_align (torchvision's Mask R-CNN settings: aligned=False,
     sampling_ratio=2, box head 7x7 and mask head 14x14 on an FPN P2 map)
     against torchvision.ops.roi_align on the GPU, where
     tinymrcnn.kernels.cuda.roi_align exists (called as
     roi_align_forward_cuda(x, rois, output_size, spatial_scale=...,
     sampling_ratio=..., aligned=...) and roi_align_backward_cuda(dy, rois,
     input_shape, same keywords), the signatures of tinymrcnn.ops),
3. times the whole model, the shapes preset on 128x128 shapes images, with
   config.device="cuda" against the same weights on "cpu": one training step
   (forward_train + backward, batch 4; the optimizer step is the same NumPy
   code on both and is left out) and one predict() of the same 4 images,
   checking that the losses and the detections agree; with --r50 also the
   R50-FPN preset (torchvision's architecture, 2 images of 512x512, no
   resizing), and with --stages a per-stage table of one training step on
   each device, with the GPU's host <-> device copies timed apart,
4. prints the tables with the device name and the date. Conv rows labelled
   'tile ...' time the same conv with other block tiles, so that one run
   also says which default tile to keep.

Timing: each row is the median of --repeats runs of forward + backward,
measured with time.perf_counter between cuda.synchronize() calls, after two
warm-up runs (compilation, cuDNN's algorithm search). Both sides include their
own allocations (numba allocates outputs with cudaMalloc; torch has a caching
allocator). Throughput = the direct convolution's FLOPs (2*N*O*Ho*Wo*C*kh*kw
for the forward, twice that for dx + dweight) / time. Targets (issue 8):
conv at least 25% of cuDNN's throughput, roi_align within 1.5x of
torchvision's time.

The model rows are medians of --model-repeats runs after 2 warm-ups (the
first compiles the Numba CPU and CUDA kernels). On "cuda" only the
convolutions and RoIAlign run on the GPU, with host <-> device copies around
each (docs/gpu.md), so these rows measure the model as it is, copies included.

Without a GPU it prints why and exits 0. --smoke runs tiny shapes (and a tiny
model on 32x32 images) and is allowed on the CUDA simulator
(NUMBA_ENABLE_CUDASIM=1): it checks that this script runs, not speed.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import tinymrcnn  # noqa: F401
except ImportError:  # run from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONV_SHAPES = [((1, 256, 64, 64), 256), ((8, 64, 128, 128), 64)]  # (N, C, H, W) -> O, 3x3 pad 1
SMOKE_CONV_SHAPES = [((1, 3, 6, 5), 4)]
# (feature map, number of RoIs, output size, spatial scale): torchvision's box and mask heads on P2
ROI_SHAPES = [((2, 256, 200, 256), 1024, 7, 0.25), ((2, 256, 200, 256), 256, 14, 0.25)]
SMOKE_ROI_SHAPES = [((1, 2, 6, 7), 3, 2, 0.25)]
SAMPLING_RATIO, ALIGNED = 2, False


def _tune_tiles():
    """Other block tiles timed beside the default (rows 'tile BMxBNxBK/TMxTN'), to pick
    the default from measurements. All compile without local memory for sm_90."""
    from tinymrcnn.kernels.cuda.conv import Tile

    return [Tile(64, 64, 8, 4, 4), Tile(128, 64, 8, 8, 4), Tile(64, 64, 16, 8, 4)]


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref|: one number per output, comparable across shapes."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30)) if ref.size else 0.0


def median_time(f, sync, repeats: int) -> float:
    f()
    f()  # warm-up: compilation, cuDNN's algorithm search, allocator
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_torch(smoke: bool):
    """(torch, its device, torchvision's roi_align): torch on CUDA with TF32 off and
    cudnn.benchmark on; with --smoke torch on the CPU (to run the code path); Nones
    where they are not installed."""
    try:
        import torch
    except ImportError:
        return None, None, None
    if smoke:
        dev = "cpu"
    elif torch.cuda.is_available():
        dev = "cuda"
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    else:
        return None, None, None
    try:
        from torchvision.ops import roi_align as tv_roi_align
    except ImportError:
        tv_roi_align = None
    return torch, dev, tv_roi_align


def torch_sync(torch, dev):
    return torch.cuda.synchronize if dev == "cuda" else (lambda: None)


def device_name(cuda) -> str:
    try:
        name = cuda.get_current_device().name
    except AttributeError:  # the simulator
        return "CUDA simulator"
    return name.decode() if isinstance(name, bytes) else str(name)


def random_rois(rng, n_images, k, height, width, scale):
    """k boxes [batch, x1, y1, x2, y2] in input-image pixels, sizes 8..400 px."""
    H, W = height / scale, width / scale
    wh = rng.uniform(8, min(400, W, H), (k, 2))
    xy = rng.uniform(0, 1, (k, 2)) * (np.array([W, H]) - wh)
    b = rng.integers(0, n_images, k)
    return np.column_stack([b, xy, xy + wh]).astype(np.float32)


def bench_conv(cuda, torch, dev, shape, O, repeats, cpu_check, rng):
    """Rows for one conv shape: the default tile first, then the other TUNE_TILES."""
    from tinymrcnn.kernels.cuda.conv import DEFAULT_TILE, conv2d_backward_cuda, conv2d_forward_cuda
    from tinymrcnn.kernels.cuda.device import to_device, to_host

    N, C, H, W = shape
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((O, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    dy = rng.standard_normal((N, O, H, W)).astype(np.float32)
    flops = 3 * 2 * N * O * H * W * C * 9  # forward, dx and dweight: one GEMM each
    name = f"conv3x3 {N}x{C}x{H}x{W}->{O}"

    refs, note, torch_row = {}, None, {}
    if cpu_check:
        try:
            from tinymrcnn.ops import conv2d, conv2d_backward
        except ImportError:
            note = "no CPU conv in tinymrcnn.ops"
        else:
            refs["cpu"] = [conv2d(x, w, b, 1, 1)] + list(conv2d_backward(dy, x, w, 1, 1))
    if torch is not None:
        tx = torch.from_numpy(x).to(dev).requires_grad_()
        tw = torch.from_numpy(w).to(dev).requires_grad_()
        tb = torch.from_numpy(b).to(dev).requires_grad_()
        tdy = torch.from_numpy(dy).to(dev)

        def theirs():
            tx.grad = tw.grad = tb.grad = None
            y = torch.nn.functional.conv2d(tx, tw, tb, 1, 1)
            y.backward(tdy)
            return y

        y = theirs()
        refs["torch"] = [y.detach().cpu().numpy(), tx.grad.cpu().numpy(), tw.grad.cpu().numpy(), tb.grad.cpu().numpy()]
        t = median_time(theirs, torch_sync(torch, dev), repeats)
        torch_row = {"torch": t, "torch_tflops": flops / t / 1e12}

    dx_, dw_, db_, ddy = to_device(x), to_device(w), to_device(b), to_device(dy)
    rows = []
    for tile in [DEFAULT_TILE] + [t for t in _tune_tiles() if t != DEFAULT_TILE]:

        def ours():
            y = conv2d_forward_cuda(dx_, dw_, db_, 1, 1, tile=tile)
            return (y,) + conv2d_backward_cuda(ddy, dx_, dw_, 1, 1, tile=tile)

        got = [to_host(a) for a in ours()]
        t = median_time(ours, cuda.synchronize, repeats)
        label = name if tile == DEFAULT_TILE else "  tile " + tile_label(tile)
        rows.append(
            dict(
                torch_row,
                op=label,
                ours=t,
                ours_tflops=flops / t / 1e12,
                note=note if tile == DEFAULT_TILE else None,
                errs={k: max(rel_err(g, r) for g, r in zip(got, ref)) for k, ref in refs.items()},
            )
        )
    return rows


def tile_label(t) -> str:
    return f"{t.bm}x{t.bn}x{t.bk}/{t.tm}x{t.tn}"


def bench_roi_align(cuda, torch, dev, tv_roi_align, roi_cuda, shape, k, out, scale, repeats, cpu_check, rng):
    from tinymrcnn.kernels.cuda.device import to_device, to_host

    fwd_cuda, bwd_cuda = roi_cuda
    N, C, H, W = shape
    x = rng.standard_normal(shape).astype(np.float32)
    rois = random_rois(rng, N, k, H, W, scale)
    dy = rng.standard_normal((k, C, out, out)).astype(np.float32)
    dx_, drois, ddy = to_device(x), to_device(rois), to_device(dy)
    kw = dict(spatial_scale=scale, sampling_ratio=SAMPLING_RATIO, aligned=ALIGNED)

    def ours():
        y = fwd_cuda(dx_, drois, out, **kw)
        return y, bwd_cuda(ddy, drois, shape, **kw)

    got = [to_host(a) for a in ours()]
    row = {"op": f"roi_align {k}x{out}x{out} on {N}x{C}x{H}x{W}", "ours": median_time(ours, cuda.synchronize, repeats)}
    errs = {}
    if cpu_check:
        from tinymrcnn.ops.roi_align import roi_align, roi_align_backward

        refs = [roi_align(x, rois, out, **kw), roi_align_backward(dy, x, rois, out, **kw)]
        errs["cpu"] = max(rel_err(g, r) for g, r in zip(got, refs))
    if torch is not None and tv_roi_align is not None:
        tx = torch.from_numpy(x).to(dev).requires_grad_()
        trois = torch.from_numpy(rois).to(dev)
        tdy = torch.from_numpy(dy).to(dev)

        def theirs():
            tx.grad = None
            y = tv_roi_align(tx, trois, (out, out), scale, SAMPLING_RATIO, ALIGNED)
            y.backward(tdy)
            return y

        y = theirs()
        errs["torch"] = max(rel_err(g, r) for g, r in zip(got, [y.detach().cpu().numpy(), tx.grad.cpu().numpy()]))
        row["torch"] = median_time(theirs, torch_sync(torch, dev), repeats)
    row["errs"] = errs
    return row


def print_table(rows, tol):
    from tinymrcnn.kernels.cuda.conv import DEFAULT_TILE

    header = (
        f"{'forward + backward':<36} {'ours ms':>9} {'torch ms':>9} {'torch/ours':>10} "
        f"{'ours TF/s':>9} {'torch TF/s':>10} {'err vs CPU':>10} {'err vs torch':>12}"
    )
    print(header)
    print("-" * len(header))
    bad = False
    for r in rows:
        t = r.get("torch")
        e = r["errs"]
        bad |= any(v > tol for v in e.values())
        fmt = lambda v, spec: format(v, spec) if v is not None else "n/a"  # noqa: E731
        print(
            f"{r['op']:<36} {r['ours'] * 1e3:9.3f} {fmt(t and t * 1e3, '9.3f'):>9} "
            f"{fmt(t and t / r['ours'], '10.2f'):>10} {fmt(r.get('ours_tflops'), '9.2f'):>9} "
            f"{fmt(r.get('torch_tflops'), '10.2f'):>10} {fmt(e.get('cpu'), '10.1e'):>10} "
            f"{fmt(e.get('torch'), '12.1e'):>12}" + (f"  ({r['note']})" if r.get("note") else "")
        )
    print(f"errors: max |ours - reference| / max |reference| over all outputs; tolerance {tol:g}")
    print(f"conv rows 'tile ...': the same conv with another block tile (default {tile_label(DEFAULT_TILE)})")
    print(
        "torch/ours > 1: ours is faster; the conv target is torch/ours >= 0.25 (25% of cuDNN's "
        "throughput), the roi_align target torch/ours >= 1/1.5"
    )
    return bad


def smoke_model_config(device):
    """A model small enough for the simulator (tests/test_model_cuda.py uses the same sizes)."""
    from tinymrcnn import MaskRCNNConfig

    return MaskRCNNConfig(
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.25, 0.25, 0.25),
        blocks_per_stage=(1, 1, 1, 1),
        stem_channels=2,
        stage_channels=(4, 4, 8, 8),
        group_norm_groups=1,
        fpn_channels=4,
        anchor_sizes=(8, 16, 32, 64, 128),
        rpn_pre_nms_top_n_train=30,
        rpn_pre_nms_top_n_test=30,
        rpn_post_nms_top_n_train=12,
        rpn_post_nms_top_n_test=12,
        rpn_batch_size_per_image=32,
        box_roi_size=2,
        mask_roi_size=3,
        box_batch_size_per_image=8,
        box_representation_size=8,
        mask_num_convs=1,
        mask_channels=4,
        box_detections_per_img=4,
        device=device,
    )


# The losses compared for the R50-FPN preset. Its RoI-head losses are not: at random
# initialisation many of its objectness scores nearly tie, so which proposals survive
# top-k and NMS, and so which RoIs the box head samples, turns on float32 rounding.
# Measured on the CPU alone: scaling the images by 1 + 1e-6 moved loss_classifier by
# 4e-4 (relative) and the other four losses by at most 1.7e-6.
RPN_LOSSES = ("loss_objectness", "loss_rpn_box_reg")


def model_inputs(preset):
    """(config for a device, images, targets, label) of one model row group."""
    from tinymrcnn import MaskRCNNConfig
    from tinymrcnn.data.shapes import ShapesDataset

    if preset == "smoke":
        config, batch, size = smoke_model_config, 1, 32
        label = "tiny model (--smoke), 32x32 images"
    elif preset == "shapes":
        config, batch, size = (lambda d: MaskRCNNConfig.shapes(device=d)), 4, 128
        label = "shapes preset, 128x128 images"
    else:  # torchvision's R50-FPN at 512x512 (no resizing), as in bench_r50_train.py
        size = 512
        config, batch = (lambda d: MaskRCNNConfig.torchvision_r50_fpn(min_size=size, max_size=size, device=d)), 2
        label = "R50-FPN preset, 512x512 images"
    ds = ShapesDataset(batch, image_size=size, seed=0)
    images = [ds[i][0] for i in range(batch)]
    targets = [{k: ds[i][1][k] for k in ("boxes", "labels", "masks")} for i in range(batch)]
    return config, images, targets, label


def bench_model(cuda, repeats, preset, stages=False):
    """Rows for one training step and one predict(), device="cuda" against device="cpu".

    With ``stages``, also one more training step on each device with the
    stages timed (runtime.StageTimer) and, on the GPU, the host <-> device
    copies: returned as the text of a table."""
    from tinymrcnn import MaskRCNN, runtime

    config, images, targets, label = model_inputs(preset)
    batch = len(images)
    models = {d: MaskRCNN(config(d), seed=0) for d in ("cpu", "cuda")}
    sync = {"cpu": lambda: None, "cuda": cuda.synchronize}
    rows = []

    def step(m):
        with runtime.session(m.config):  # config.device picks the kernels only inside a session
            return runtime.compute_gradients(m, images, targets)

    def predict(m):
        with runtime.session(m.config):
            return m.predict(images)

    losses = {d: step(m) for d, m in models.items()}
    errs = {k: abs(losses["cuda"][k] - v) / max(abs(v), 1e-12) for k, v in losses["cpu"].items()}
    worst = max(errs, key=errs.get)
    checked = errs if preset != "r50" else {k: errs[k] for k in RPN_LOSSES}
    t = {d: median_time(lambda m=m: step(m), sync[d], repeats) for d, m in models.items()}
    rows.append(
        {
            "op": f"training step, batch {batch} (fwd+bwd)",
            "gpu": t["cuda"],
            "cpu": t["cpu"],
            "check": f"losses: max rel. diff {errs[worst]:.1e} ({worst})"
            + (f"; RPN losses {max(checked.values()):.1e}" if preset == "r50" else ""),
            "bad": not max(checked.values()) <= 1e-3,
        }
    )

    preds = {d: predict(m) for d, m in models.items()}
    counts = {d: [len(p["scores"]) for p in preds[d]] for d in preds}
    if counts["cpu"] == counts["cuda"]:
        diff = max(
            (
                float(np.abs(a["scores"] - b["scores"]).max())
                for a, b in zip(preds["cpu"], preds["cuda"])
                if len(a["scores"])
            ),
            default=0.0,
        )
        check, bad = f"detections {sum(counts['cpu'])}; max score diff {diff:.1e}", not diff <= 1e-3
    else:
        check, bad = f"detection counts differ: cpu {counts['cpu']}, cuda {counts['cuda']}", False
    t = {d: median_time(lambda m=m: predict(m), sync[d], repeats) for d, m in models.items()}
    rows.append({"op": f"predict(), batch {batch}", "gpu": t["cuda"], "cpu": t["cpu"], "check": check, "bad": bad})
    table = stage_table(cuda, models, step, label) if stages else None
    return label, rows, table


def stage_table(cuda, models, step, label):
    """One training step per device with its stages timed; GPU copies counted apart."""
    import tinymrcnn.kernels.cuda.backend as backend
    import tinymrcnn.kernels.cuda.conv as conv
    import tinymrcnn.kernels.cuda.roi_align as roi
    from tinymrcnn import runtime

    copies = {"to device": [0.0, 0, 0], "to host": [0.0, 0, 0]}  # seconds, calls, bytes

    def timed(name, f):
        def wrapper(a):
            cuda.synchronize()  # the kernels queued before the copy are not the copy's time
            t0 = time.perf_counter()
            out = f(a)
            cuda.synchronize()
            c = copies[name]
            c[0] += time.perf_counter() - t0
            c[1] += 1
            c[2] += out.nbytes if name == "to device" else a.nbytes
            return out

        return wrapper

    seconds = {}
    for d, m in models.items():
        timer = runtime.StageTimer()
        patched = []
        if d == "cuda":
            for mod in (backend, conv, roi):
                for name, attr in (("to device", "to_device"), ("to host", "to_host")):
                    if hasattr(mod, attr):
                        patched.append((mod, attr, getattr(mod, attr)))
                        setattr(mod, attr, timed(name, getattr(mod, attr)))
        try:
            t0 = time.perf_counter()
            with timer.watch(m):
                step(m)
            if d == "cuda":
                cuda.synchronize()
            seconds[d] = (time.perf_counter() - t0, timer.seconds)
        finally:
            for mod, attr, f in patched:
                setattr(mod, attr, f)
    names = list(dict.fromkeys(list(seconds["cpu"][1]) + list(seconds["cuda"][1])))
    lines = [f"{'stages of one training step: ' + label:<52} {'GPU ms':>9} {'CPU ms':>9}"]
    lines.append("-" * len(lines[0]))
    for n in names:
        lines.append(f"{n:<52} {1e3 * seconds['cuda'][1].get(n, 0):9.1f} {1e3 * seconds['cpu'][1].get(n, 0):9.1f}")
    for name, (s, calls, nbytes) in copies.items():
        row = f"host <-> device: {name}, {calls} copies, {nbytes / 1e6:.0f} MB"
        lines.append(f"{row:<52} {1e3 * s:9.1f} {'':>9}")
    lines.append(f"{'whole step':<52} {1e3 * seconds['cuda'][0]:9.1f} {1e3 * seconds['cpu'][0]:9.1f}")
    lines.append("(nested stages count in their parents too; copies are timed between synchronisations)")
    return "\n".join(lines)


def print_model_table(label, rows):
    header = f"{'model: ' + label:<42} {'GPU ms':>9} {'CPU ms':>9} {'CPU/GPU':>8}  check"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['op']:<42} {r['gpu'] * 1e3:9.1f} {r['cpu'] * 1e3:9.1f} {r['cpu'] / r['gpu']:8.2f}  {r['check']}")
    print(
        'GPU: config.device="cuda" (convolutions and RoIAlign on the GPU, the rest on the host, '
        "copies included); CPU: the same weights on the default path"
    )
    return any(r["bad"] for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--no-cpu-check", action="store_true", help="skip the comparison with the CPU ops (slow on full-size inputs)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, torch on the CPU; runs on the CUDA simulator too"
    )
    parser.add_argument(
        "--model-repeats", type=int, default=5, help="timed runs of the model's training step and predict() (default 5)"
    )
    parser.add_argument(
        "--no-model", action="store_true", help="skip the model rows (training step and predict(), GPU vs CPU)"
    )
    parser.add_argument(
        "--r50", action="store_true", help="also the R50-FPN preset's rows (2 images 512x512), GPU vs CPU"
    )
    parser.add_argument(
        "--stages", action="store_true", help="per-stage tables of one training step per model, copies included"
    )
    args = parser.parse_args()

    from tinymrcnn.kernels.cuda.device import is_simulator, require_cuda

    try:
        cuda = require_cuda()
    except RuntimeError as e:
        print(f"No GPU benchmark on this machine: {e}")
        print("Nothing was measured.")
        return 0
    if is_simulator() and not args.smoke:
        print(
            "NUMBA_ENABLE_CUDASIM is set: the CUDA simulator runs threads in Python and measures "
            "nothing useful. Unset it to benchmark, or pass --smoke to check the script."
        )
        return 0
    try:
        from tinymrcnn.kernels.cuda.roi_align import roi_align_backward_cuda, roi_align_forward_cuda

        roi_cuda = (roi_align_forward_cuda, roi_align_backward_cuda)
    except ImportError:
        roi_cuda = None
    torch, dev, tv_roi_align = load_torch(args.smoke)
    repeats = 1 if args.smoke else args.repeats
    conv_shapes = SMOKE_CONV_SHAPES if args.smoke else CONV_SHAPES
    roi_shapes = SMOKE_ROI_SHAPES if args.smoke else ROI_SHAPES

    import numba

    print(f"tinymrcnn GPU benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"device: {device_name(cuda)}; numba {numba.__version__}, numba.cuda "
        f"{getattr(cuda, 'implementation', '?')}"
        + (
            f"; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, TF32 off"
            if dev == "cuda"
            else "; torch on the CPU (--smoke)"
            if dev == "cpu"
            else "; torch with CUDA not available: no baseline"
        )
    )
    print(f"float32; median of {repeats} runs after 2 warm-ups\n")

    rng = np.random.default_rng(0)
    rows = [r for s, O in conv_shapes for r in bench_conv(cuda, torch, dev, s, O, repeats, not args.no_cpu_check, rng)]
    if roi_cuda is None:
        print("tinymrcnn.kernels.cuda.roi_align is not there yet: no roi_align rows\n")
    else:
        rows += [
            bench_roi_align(cuda, torch, dev, tv_roi_align, roi_cuda, s, k, o, sc, repeats, not args.no_cpu_check, rng)
            for s, k, o, sc in roi_shapes
        ]
    bad = print_table(rows, tol=1e-4)
    if not args.no_model:
        if args.smoke:  # the simulator's threads hand over the GIL at every barrier
            sys.setswitchinterval(1e-4)
        presets = ["smoke"] if args.smoke else ["shapes"] + (["r50"] if args.r50 else [])
        for preset in presets:
            label, model_rows, table = bench_model(
                cuda, 1 if args.smoke else args.model_repeats, preset, stages=args.stages
            )
            print()
            bad |= print_model_table(label, model_rows)
            if table:
                print()
                print(table)
    if bad:
        print("MISMATCH: a GPU result differs from its reference by more than the tolerance")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
