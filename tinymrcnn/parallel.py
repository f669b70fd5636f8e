"""Data-parallel training over CPU cores: one model replica per worker process.

Why
---
A training step of the shapes preset is a long chain of small operations
(convolutions on 16x16 maps, GroupNorms, RoIAlign on a few dozen boxes). Split
inside each operation across two cores, they gain nothing (measured: 241 ms
per step with one BLAS thread, 237 ms with two); but two *independent*
halves of the batch keep both cores busy all the time (231 ms per step in one
process, 130 ms with two workers: ``benchmarks/bench_train.py``). So a batch of B images
is cut into ``n`` shards, each worker runs ``forward_train`` and ``backward``
on its shard, and the gradients are averaged:

    grad = (1/n) * sum over workers r of  d loss_r / d theta

which is the gradient of the mean of the shards' losses. Each loss is
normalised within its shard (sampled anchors, sampled RoIs, mask pixels), so
with equal per-image sample counts -- the usual case, the samplers fill a
fixed number per image -- this equals the whole batch's gradient. This is
PyTorch's DistributedDataParallel, done by hand: GroupNorm (the shapes
preset) has no batch statistics; a BatchNorm in training mode would normalise
each shard with its own statistics, as DDP without SyncBatchNorm does.

How
---
Worker 0 is the calling process: it keeps the model that is trained, the
optimizer and the checkpoints. Workers 1..n-1 are separate interpreters,
each with a replica of the model. Parameters and gradients travel through shared memory as flat
float arrays, in the order of ``model.parameters()``:

    step s:  main writes theta into `params`, sends (s, image indices) to each worker
             every worker: copy theta in -> load its images -> forward_train -> backward
                           -> write its gradient into its row of `grads`
             main: wait, average the rows into param.grad, clip, optimizer step

Loading a shard's images (~1 ms per shapes image) happens while a process
would otherwise wait: each step's message also carries the indices of step
s + 1, which a worker loads after sending its gradient, and the main process
loads its own next shard while it waits for the workers' gradients
(``train.train_step``'s ``while_waiting``).

Each worker draws its flips and samples from generators seeded by
(seed, step, rank), so a run with the same number of workers is reproducible
and resumes exactly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from types import SimpleNamespace

import numpy as np

from . import runtime


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int, batch_size: int) -> int:
    """``workers`` as asked (>= 1), or for 0 one per core, at most one per image."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per CPU core), got {workers}")
    n = workers or available_cores()
    return max(1, min(n, batch_size))


def shard(indices: np.ndarray, n: int) -> list[np.ndarray]:
    """Split a batch's image indices into ``n`` contiguous shards of near-equal size."""
    return list(np.array_split(np.asarray(indices), n))


class FlatView:
    """The parameters of a model as one flat float array, and back.

    ``offsets[i]:offsets[i+1]`` is parameter i (in ``model.parameters()``
    order, trainable ones only).
    """

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        sizes = [p.data.size for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.size = int(self.offsets[-1])
        self.dtype = self.params[0].data.dtype if self.params else np.dtype(np.float32)

    def _slices(self):
        for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
            yield p, int(a), int(b)

    def write_params(self, out: np.ndarray) -> None:
        for p, a, b in self._slices():
            out[a:b] = p.data.ravel()

    def read_params(self, src: np.ndarray) -> None:
        for p, a, b in self._slices():
            p.data[...] = src[a:b].reshape(p.data.shape)

    def write_grads(self, out: np.ndarray) -> None:
        for p, a, b in self._slices():
            out[a:b] = p.grad.ravel()

    def average_grads(self, others: list[np.ndarray]) -> None:
        """param.grad <- (param.grad + sum of the other workers' rows) / n_workers."""
        n = len(others) + 1
        for p, a, b in self._slices():
            g = p.grad.reshape(-1)  # a view: the gradient is contiguous
            for o in others:
                g += o[a:b]
            g *= 1.0 / n
            p.grad = g.reshape(p.data.shape)


class _Shared:
    """One block of shared memory viewed as a float array of a given shape."""

    def __init__(self, shape, dtype, name=None):
        from multiprocessing import shared_memory

        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        self.owner = name is None
        self.shm = shared_memory.SharedMemory(create=self.owner, size=nbytes, name=name)
        if not self.owner:
            # Only the creator may unlink the block: Python < 3.13 registers an attached
            # block with this process's resource tracker, which would unlink it at exit.
            from multiprocessing import resource_tracker

            resource_tracker.unregister(self.shm._name, "shared_memory")
        self.array = np.ndarray(shape, dtype=dtype, buffer=self.shm.buf)

    def close(self):
        self.array = None
        self.shm.close()
        if self.owner:
            self.shm.unlink()


class WorkerPool:
    """Workers 1..n-1 of a data-parallel run (worker 0 is the caller).

    Each worker is a fresh interpreter (``python -m tinymrcnn.parallel``)
    joined to this process by a socket pair, so nothing of the caller's
    ``__main__`` (a script, a notebook) is imported or copied. Use as a
    context manager around the training loop; every method raises
    RuntimeError with the worker's traceback if a worker fails or dies.
    """

    def __init__(self, model, n_workers: int, train_cfg_dict: dict):
        self.n = n_workers
        self.flat = FlatView(model)
        self.params = _Shared((self.flat.size,), self.flat.dtype)
        self.grads = _Shared((max(n_workers - 1, 1), self.flat.size), self.flat.dtype)
        self.conns, self.procs = [], []
        try:
            for rank in range(1, n_workers):
                self._spawn(rank, model, train_cfg_dict)
            for rank in range(1, n_workers):
                self._recv(rank)  # "ready": the replica is built
        except BaseException:
            self.close()
            raise

    def _spawn(self, rank, model, train_cfg_dict):
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # the child imports this very package, installed or not
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        proc = subprocess.Popen(
            [sys.executable, "-m", "tinymrcnn.parallel", str(theirs.fileno())], pass_fds=(theirs.fileno(),), env=env
        )
        theirs.close()
        conn = Connection(ours.detach())
        self.conns.append(conn)
        self.procs.append(proc)
        conn.send(
            (
                rank,
                self.n,
                model.config.to_json(),
                train_cfg_dict,
                self.params.shm.name,
                self.grads.shm.name,
                self.flat.size,
                str(self.flat.dtype),
            )
        )

    def _recv(self, rank: int):
        try:
            kind, payload = self.conns[rank - 1].recv()
        except (EOFError, ConnectionError):
            code = self.procs[rank - 1].wait(timeout=10)
            raise RuntimeError(f"training worker {rank} died (exit code {code})") from None
        if kind == "error":
            raise RuntimeError(f"training worker {rank} failed:\n{payload}")
        return payload

    def start_step(self, step: int, shards: list[np.ndarray], next_shards: list[np.ndarray] | None = None) -> None:
        """Publish the current parameters and hand shards 1..n-1 to the workers.

        ``next_shards``: the shards of step + 1, which each worker then loads
        while it waits for that step (after sending its gradient, while this
        process averages them and updates the parameters).
        """
        self.flat.write_params(self.params.array)
        for rank in range(1, self.n):
            nxt = None if next_shards is None else next_shards[rank].tolist()
            self.conns[rank - 1].send(("step", (step, shards[rank].tolist(), nxt)))

    def finish_step(self) -> list[dict]:
        """Wait for the workers; average their gradients into the caller's; their losses."""
        losses = [self._recv(rank) for rank in range(1, self.n)]
        self.flat.average_grads([self.grads.array[r] for r in range(self.n - 1)])
        return losses

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop", None))
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
        if self.params is not None:
            self.params.close()
            self.grads.close()
            self.params = self.grads = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _worker_main(conn):
    """A replica: waits for steps, computes its shard's gradient into shared memory."""
    params = grads = None
    try:
        rank, n_workers, config_json, train_cfg_dict, params_name, grads_name, size, dtype = conn.recv()
        import numba

        from .config import MaskRCNNConfig
        from .data.batches import load_batch, make_datasets, step_seeds
        from .model.mask_rcnn import MaskRCNN

        numba.set_num_threads(1)  # one core per worker
        runtime.keep_freed_memory()
        cfg = SimpleNamespace(**train_cfg_dict)  # the trainer's TrainConfig, as a dict
        model = MaskRCNN(MaskRCNNConfig.from_json(config_json), seed=cfg.seed)
        model.train()
        flat = FlatView(model)
        if flat.size != size:
            raise RuntimeError(f"replica has {flat.size} parameters, the trained model {size}")
        params = _Shared((size,), dtype, name=params_name)
        grads = _Shared((max(n_workers - 1, 1), size), dtype, name=grads_name)
        train_set, _ = make_datasets(cfg, model.config.class_names, check_files=False)
        conn.send(("ready", None))

        def load(step, indices):
            return load_batch(train_set, indices, step, cfg.seed, cfg.hflip, rank, n_workers)

        ahead = None  # (step, indices, batch): loaded while the caller finished the step before
        with runtime.session(model.config, processes=n_workers):  # for the worker's life (~1 ms a step otherwise)
            while True:
                kind, payload = conn.recv()
                if kind == "stop":
                    break
                step, indices, next_indices = payload
                flat.read_params(params.array)
                hit = ahead is not None and ahead[:2] == (step, indices)
                images, targets = ahead[2] if hit else load(step, indices)
                model.rng = np.random.default_rng(step_seeds(cfg.seed, step, rank, n_workers)[1])
                losses = runtime.compute_gradients(model, images, targets)
                flat.write_grads(grads.array[rank - 1])
                conn.send(("losses", losses))
                # (an error loading ahead reaches the caller at the next finish_step, as if loaded then)
                ahead = None if next_indices is None else (step + 1, next_indices, load(step + 1, next_indices))
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        for block in (params, grads):
            if block is not None:
                block.close()


if __name__ == "__main__":
    _worker_main(Connection(int(sys.argv[1])))
