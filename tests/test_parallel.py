"""Data-parallel training (tinymrcnn/parallel.py): the averaged gradient, exact resume, failures."""

import numpy as np
import pytest
from test_train import cfg, small_model_config

from tinymrcnn.model.mask_rcnn import MaskRCNN
from tinymrcnn.parallel import FlatView, WorkerPool, resolve_workers, shard
from tinymrcnn.train import load_batch, make_datasets, step_seeds, train


def test_resolve_workers_and_shards():
    assert resolve_workers(3, 4) == 3
    assert resolve_workers(8, 4) == 4  # at most one worker per image
    assert 1 <= resolve_workers(0, 4) <= 4
    with pytest.raises(ValueError, match="workers must be >= 0"):
        resolve_workers(-1, 4)
    parts = shard(np.arange(5), 2)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4]]
    # one worker: the single-process seeds, whatever the rank
    assert step_seeds(0, 7, 0, 1) == ([0, 104729, 7], [0, 15485863, 7])
    assert step_seeds(0, 7, 1, 2) == ([0, 104729, 7, 1], [0, 15485863, 7, 1])


def test_flat_view_round_trip():
    model = MaskRCNN(small_model_config(), seed=0)
    flat = FlatView(model)
    assert flat.size == sum(p.data.size for p in model.parameters())
    buf = np.empty(flat.size, np.float32)
    flat.write_params(buf)
    other = MaskRCNN(small_model_config(), seed=1)
    FlatView(other).read_params(buf)
    for p, q in zip(model.parameters(), other.parameters()):
        np.testing.assert_array_equal(p.data, q.data)


def shard_gradient(model, train_set, indices, step, rank, n, seed=0):
    """The gradient of one shard's loss, computed in this process."""
    images, targets = load_batch(train_set, indices, step, seed, True, rank, n)
    model.rng = np.random.default_rng(step_seeds(seed, step, rank, n)[1])
    model.zero_grad()
    losses = model.forward_train(images, targets)
    model.backward()
    return losses, [p.grad.copy() for p in model.parameters()]


def test_pool_gradient_is_the_mean_of_the_shard_gradients(tmp_path):
    c = cfg(tmp_path, "dp", iters=1, batch_size=4, workers=2)
    model = MaskRCNN(small_model_config(), seed=0)
    train_set, _ = make_datasets(c)
    step, shards = 3, shard(np.array([5, 1, 6, 2]), 2)
    with WorkerPool(model, 2, c.to_dict()) as pool:
        pool.start_step(step, shards)
        images, targets = load_batch(train_set, shards[0], step, c.seed, c.hflip, 0, 2)
        model.rng = np.random.default_rng(step_seeds(c.seed, step, 0, 2)[1])
        model.zero_grad()
        own = model.forward_train(images, targets)
        model.backward()
        (theirs,) = pool.finish_step()
        averaged = [p.grad.copy() for p in model.parameters()]

    reference = MaskRCNN(small_model_config(), seed=0)
    l0, g0 = shard_gradient(reference, train_set, shards[0], step, 0, 2)
    l1, g1 = shard_gradient(reference, train_set, shards[1], step, 1, 2)
    for k in l0:
        np.testing.assert_allclose(own[k], l0[k], rtol=1e-5)
        np.testing.assert_allclose(theirs[k], l1[k], rtol=1e-5)
    assert any(abs(l0[k] - l1[k]) > 1e-3 for k in l0)  # the shards really differ
    for (name, _), a, b, c_ in zip(model.named_parameters(), averaged, g0, g1):
        expected = (b + c_) / 2
        scale = max(np.abs(expected).max(), 1e-12)
        assert np.abs(a - expected).max() <= 1e-5 * scale, name


def test_a_worker_uses_the_shard_it_loaded_ahead_only_for_that_step(tmp_path):
    c = cfg(tmp_path, "ahead", iters=1, batch_size=4, workers=2)
    model = MaskRCNN(small_model_config(), seed=0)
    train_set, _ = make_datasets(c)
    zero = [np.array([0]), np.array([1])]
    ahead, other = [np.array([2]), np.array([3, 4])], [np.array([2]), np.array([5, 6])]
    reference = MaskRCNN(small_model_config(), seed=0)
    expected = {
        name: shard_gradient(reference, train_set, indices, 7, 1, 2)[0]
        for name, indices in (("ahead", ahead[1]), ("other", other[1]))
    }
    assert expected["ahead"] != expected["other"]
    # the flips of step 7 are not those of step 6: a shard loaded ahead with the wrong step's would differ
    flipped = [load_batch(train_set, ahead[1], s, c.seed, c.hflip, 1, 2)[0][0] for s in (6, 7)]
    assert not np.array_equal(*flipped)
    got = {}
    with WorkerPool(model, 2, c.to_dict()) as pool:
        for name, shards in (("ahead", ahead), ("other", other)):
            pool.start_step(6, zero, next_shards=ahead)  # the worker loads ahead[1] for step 7
            pool.finish_step()
            pool.start_step(7, shards)  # ... and uses it only if step 7 takes those images
            (got[name],) = pool.finish_step()
    for name in expected:
        for k, v in expected[name].items():
            np.testing.assert_allclose(got[name][k], v, rtol=1e-5, err_msg=f"{name} {k}")


def test_the_trainer_takes_the_shard_it_loaded_ahead_only_for_that_step(tmp_path):
    from tinymrcnn.train import _Shards

    c = cfg(tmp_path, "ahead", iters=1, batch_size=4, workers=2)
    train_set, _ = make_datasets(c)
    batches = _Shards(train_set, c, 2)
    batches.load_ahead(5)
    ahead = batches.ahead
    images, targets = batches.take(5)
    assert images is ahead[1] and targets is ahead[2]
    batches.load_ahead(5)
    images, _ = batches.take(6)  # another step: loaded now, with step 6's images and flips
    fresh, _ = load_batch(train_set, batches.indices(6)[0], 6, c.seed, c.hflip, 0, 2)
    for a, b in zip(images, fresh):
        np.testing.assert_array_equal(a, b)
    assert batches.ahead is None

    def unreadable(step):
        raise OSError(f"cannot read an image of step {step}")

    batches.load = unreadable
    batches.load_ahead(7)  # not this step's error ...
    assert batches.ahead is None
    with pytest.raises(OSError, match="step 7"):
        batches.take(7)  # ... but step 7's


def test_data_parallel_resume_continues_exactly(tmp_path):
    full = train(cfg(tmp_path, "full", iters=4, workers=2), small_model_config(), progress=False)
    train(cfg(tmp_path, "split", iters=2, workers=2, checkpoint_every=2), small_model_config(), progress=False)
    resumed = train(cfg(tmp_path, "split", iters=4, workers=2), resume=True, progress=False)
    a = [r["loss"] for r in full["history"][2:]]
    b = [r["loss"] for r in resumed["history"]]
    assert len(b) == 2
    np.testing.assert_allclose(b, a, rtol=1e-6)
    m1, m2 = MaskRCNN.load(full["checkpoint"]), MaskRCNN.load(resumed["checkpoint"])
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=1e-5, atol=1e-7, err_msg=n)


def test_a_failing_worker_is_reported_with_its_traceback(tmp_path):
    c = cfg(tmp_path, "bad", iters=1, workers=2)
    model = MaskRCNN(small_model_config(), seed=0)
    bad = [np.array([0]), np.array([c.num_train_images + 100])]
    with WorkerPool(model, 2, c.to_dict()) as pool:
        pool.start_step(0, [np.array([0]), np.array([1])], next_shards=bad)
        pool.finish_step()  # failing to load step 1 ahead is not step 0's error ...
        pool.start_step(1, bad)
        with pytest.raises(RuntimeError, match=r"training worker 1 failed:(.|\n)*Error"):
            pool.finish_step()  # ... but step 1's
