"""The whole model with config.device="cuda" against the same model on the CPU.

A training step (the five losses and every parameter's gradient) and predict()
must agree between device="cpu" and device="cuda" when the GPU kernels run on
Numba's CUDA simulator. The simulator runs each GPU thread as a Python thread,
so the model is tiny: 32x32 shapes images, 2-8 channels, 2x2 box and 3x3 mask
RoIs. As in tests/test_conv_cuda.py, the simulator runs in a child process
(this file run with ``--simulate OUT.npz``, NUMBA_ENABLE_CUDASIM=1 set from the
start) so it cannot leak into other test modules; the child writes both
devices' results to an .npz file and the assertions run here.

The other tests need no simulator: asking for "cuda" without a GPU or without
numba.cuda gives one clear RuntimeError when the runtime session starts, and
the config field is validated and saved.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# case name: (config overrides, number of images, also compare predict())
CASES = {
    "avg_aligned_batch2": (dict(roi_align_mode="avg", roi_aligned=True), 2, True),
    "max_legacy_batch1": (dict(roi_align_mode="max", roi_aligned=False, roi_sampling_ratio=0), 1, True),
}
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
GPU_FUNCS = (
    "conv2d_forward_cuda",
    "conv2d_backward_cuda",
    "conv_transpose2d_forward_cuda",
    "conv_transpose2d_backward_cuda",
    "roi_align_forward_cuda",
    "roi_align_backward_cuda",
)
RTOL = 1e-4  # float32: the GPU kernels sum in another order than the CPU's BLAS


def tiny_config(**overrides):
    """The shapes preset shrunk until the simulator runs a training step in seconds."""
    from tinymrcnn import MaskRCNNConfig

    cfg = dict(
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.25, 0.25, 0.25),
        block="basic",
        blocks_per_stage=(1, 1, 1, 1),
        stem_channels=2,
        stage_channels=(4, 4, 8, 8),
        norm="group",
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
        box_score_thresh=0.0,
    )
    cfg.update(overrides)
    return MaskRCNNConfig(**cfg)


def tiny_batch(n):
    from tinymrcnn.data.shapes import ShapesDataset

    ds = ShapesDataset(n, image_size=32, seed=3)
    items = [ds[i] for i in range(n)]
    return ([img for img, _ in items], [{k: t[k] for k in ("boxes", "labels", "masks")} for _, t in items])


# ---------------------------------------------------------------------------
# The child process: both devices, every case, on the simulator.


def _count_gpu_calls(counts):
    """Wrap the GPU host functions (looked up at call time by the layers) to count calls."""
    from tinymrcnn.kernels.cuda import conv, roi_align

    for mod in (conv, roi_align):
        for name in GPU_FUNCS:
            if hasattr(mod, name):
                f = getattr(mod, name)

                def counted(*a, _f=f, _name=name, **k):
                    counts[_name] = counts.get(_name, 0) + 1
                    return _f(*a, **k)

                setattr(mod, name, counted)


def _unzero(model):
    """Give the zero-initialised parameters seeded values in [0.5, 1.5].

    Each residual block's last norm starts at zero (backbone.py), which would
    stop every gradient inside the block's branch: the test would compare zeros.
    """
    rng = np.random.default_rng(7)
    for _, p in model.named_parameters():
        if not p.data.any():
            p.data = rng.uniform(0.5, 1.5, p.data.shape).astype(p.data.dtype)


def _child_main(out_path):
    from tinymrcnn import MaskRCNN, runtime
    from tinymrcnn.kernels.cuda.device import is_simulator

    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and is_simulator()
    # The simulator's threads hand the GIL to each other at every syncthreads;
    # Python's default 5 ms switch interval makes that ~8x slower.
    sys.setswitchinterval(1e-4)
    counts = {}
    _count_gpu_calls(counts)
    out = {}
    for case, (overrides, n, predict) in CASES.items():
        images, targets = tiny_batch(n)
        for device in ("cpu", "cuda"):
            key = f"{case}/{device}"
            counts.clear()
            model = MaskRCNN(tiny_config(device=device, **overrides), seed=0)
            _unzero(model)
            with runtime.session(model.config):  # the ops run on config.device inside
                losses = runtime.compute_gradients(model, images, targets)
                preds = model.predict(images) if predict else []
            for name in LOSS_NAMES:
                out[f"{key}/loss/{name}"] = np.float64(losses[name])
            for name, p in model.named_parameters():
                out[f"{key}/grad/{name}"] = p.grad
            for i, r in enumerate(preds):
                for f in ("boxes", "labels", "scores", "masks"):
                    out[f"{key}/pred{i}/{f}"] = r[f]
            for name in GPU_FUNCS:
                out[f"{key}/calls/{name}"] = np.int64(counts.get(name, 0))
    np.savez(out_path, **out)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out_path = tmp_path_factory.mktemp("model_cudasim") / "out.npz"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, __file__, "--simulate", str(out_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"simulator run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with np.load(out_path) as f:
        return dict(f)


def _pairs(sim, case, kind):
    """[(name, cpu value, cuda value)] of one kind of result (loss, grad, pred..., calls)."""
    cpu = f"{case}/cpu/{kind}"
    return [
        (k[len(cpu) :].lstrip("/"), sim[k], sim[f"{case}/cuda/{k[len(case) + 5 :]}"])
        for k in sorted(sim)
        if k.startswith(cpu)
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_model_runs_every_conv_and_roi_align_on_the_gpu(sim, case):
    calls = {name: (int(c), int(g)) for name, c, g in _pairs(sim, case, "calls")}
    assert all(c == 0 for c, _ in calls.values()), f"the CPU model called GPU code: {calls}"
    # one training step and a predict(): every one of the six GPU functions is used
    assert all(g > 0 for _, g in calls.values()), f"a GPU function was never called: {calls}"


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_losses_match_cpu(sim, case):
    pairs = _pairs(sim, case, "loss")
    assert [name for name, _, _ in pairs] == sorted(LOSS_NAMES)
    for name, cpu, gpu in pairs:
        assert np.isfinite(cpu) and cpu > 0, (name, cpu)
        np.testing.assert_allclose(gpu, cpu, rtol=RTOL, atol=0, err_msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_gradients_match_cpu(sim, case):
    pairs = _pairs(sim, case, "grad")
    assert len(pairs) > 40, len(pairs)
    zero = []
    for name, cpu, gpu in pairs:
        assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype == np.float32, name
        scale = float(np.abs(cpu).max())
        if scale == 0.0:
            np.testing.assert_array_equal(gpu, cpu, err_msg=name)
            zero.append(name)
            continue
        err = float(np.abs(gpu.astype(np.float64) - cpu).max())
        assert err <= RTOL * scale, f"{name}: max |gpu - cpu| = {err:.3g}, scale {scale:.3g}"
    # the comparison means something only if gradients reached (almost) every parameter
    assert len(zero) <= 2, f"{len(zero)} of {len(pairs)} gradients are zero: {zero}"


@pytest.mark.parametrize("case", [c for c, (_, _, predict) in CASES.items() if predict])
def test_predict_matches_cpu(sim, case):
    n = CASES[case][1]
    for i in range(n):
        got = {name: (cpu, gpu) for name, cpu, gpu in _pairs(sim, case, f"pred{i}")}
        cpu_labels, gpu_labels = got["labels"]
        assert len(cpu_labels) > 0, "no detections: the comparison would be empty"
        np.testing.assert_array_equal(gpu_labels, cpu_labels)
        np.testing.assert_allclose(got["scores"][1], got["scores"][0], rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(got["boxes"][1], got["boxes"][0], rtol=0, atol=RTOL * 32)  # 32 px
        np.testing.assert_allclose(got["masks"][1], got["masks"][0], rtol=0, atol=RTOL)  # in [0, 1]


# ---------------------------------------------------------------------------
# No GPU, no numba.cuda, bad settings: one clear message, checked without the simulator.


def _no_sim_env():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _gpu_present():
    code = "from tinymrcnn.kernels.cuda.device import cuda_available; print(cuda_available())"
    run = subprocess.run([sys.executable, "-c", code], env=_no_sim_env(), capture_output=True, text=True, timeout=300)
    return run.stdout.strip() == "True"


NO_GPU_SCRIPT = f"""
import sys
sys.path.insert(0, {os.path.join(REPO, "tests")!r})
from test_model_cuda import tiny_config
from tinymrcnn import runtime
with runtime.session(tiny_config(device="cuda")):
    pass
"""


def test_cuda_without_a_gpu_fails_when_the_session_starts_with_one_message():
    if _gpu_present():
        pytest.skip("this machine has a GPU")
    run = subprocess.run(
        [sys.executable, "-c", NO_GPU_SCRIPT], env=_no_sim_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode != 0
    err = run.stderr
    last = err.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: device 'cuda': "), err
    assert "no usable NVIDIA GPU" in last and "device='cpu'" in last, last
    # one exception, raised from tinymrcnn: no chained numba traceback
    assert "During handling" not in err and "direct cause" not in err, err
    assert err.count("Traceback") == 1, err
    assert "site-packages/numba" not in err, err


def test_cuda_without_numba_cuda_names_the_install_command(monkeypatch):
    from tinymrcnn import kernels, runtime

    monkeypatch.setitem(sys.modules, "numba.cuda", None)  # `import numba.cuda` now fails
    with pytest.raises(RuntimeError, match=r'pip install "tinymrcnn\[cuda\]"') as e:
        with runtime.session(tiny_config(device="cuda")):
            pass
    assert str(e.value).startswith("device 'cuda': ")
    assert kernels.get_device() == "cpu"
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_cpu_model_never_imports_numba_cuda():
    code = (
        "import sys\n"
        f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
        "from test_model_cuda import tiny_config\n"
        "from tinymrcnn import MaskRCNN\n"
        "from test_model_cuda import tiny_batch\n"
        "from tinymrcnn import runtime\n"
        "m = MaskRCNN(tiny_config())\n"
        "with runtime.session(m.config):\n"
        "    runtime.compute_gradients(m, *tiny_batch(1))\n"
        "assert 'numba.cuda' not in sys.modules, 'numba.cuda was imported'\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=_no_sim_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr


def test_device_field_is_validated_and_saved():
    from tinymrcnn import MaskRCNNConfig

    assert MaskRCNNConfig().device == "cpu" and MaskRCNNConfig.shapes().device == "cpu"
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'gpu'"):
        MaskRCNNConfig(device="gpu")
    with pytest.raises(ValueError, match="dtype must be float32"):
        MaskRCNNConfig(device="cuda", dtype="float64")
    cfg = MaskRCNNConfig.shapes(device="cuda")
    assert MaskRCNNConfig.from_json(cfg.to_json()) == cfg
    # checkpoints written before the field existed load as "cpu"
    import json

    raw = json.loads(MaskRCNNConfig.shapes().to_json())
    del raw["device"]
    assert MaskRCNNConfig.from_json(json.dumps(raw)).device == "cpu"


def test_load_can_override_the_saved_device(tmp_path):
    from tinymrcnn import MaskRCNN

    path = str(tmp_path / "m.npz")
    MaskRCNN(tiny_config(), seed=0).save(path)
    m = MaskRCNN.load(path, device="cpu")
    assert m.config.device == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        MaskRCNN.load(path, device="tpu")


def test_cli_device_flag():
    from tinymrcnn.cli import build_parser

    p = build_parser()
    assert p.parse_args(["predict", "--checkpoint", "c.npz", "a.png", "--out", "o"]).device is None
    assert (
        p.parse_args(["predict", "--checkpoint", "c.npz", "a.png", "--out", "o", "--device", "cuda"]).device == "cuda"
    )
    assert p.parse_args(["evaluate", "--checkpoint", "c.npz", "--device", "cpu"]).device == "cpu"
    assert p.parse_args(["train", "--out", "r", "--device", "cuda"]).device == "cuda"
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--out", "r", "--device", "gpu"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--simulate":
        sys.path.insert(0, REPO)
        _child_main(sys.argv[2])
    else:
        sys.exit(f"usage: NUMBA_ENABLE_CUDASIM=1 {sys.argv[0]} --simulate OUT.npz")
