"""Checkpoints as .npz files: written atomically, read without pickle.

A checkpoint is a plain NumPy ``.npz`` archive of named arrays. Text
(the config, training state) is stored as a JSON string inside a uint8
array under a ``__json__/`` key, so loading never needs ``allow_pickle``.

Writing goes to a temporary file in the same folder and is then renamed over
the target (``os.replace`` is atomic on POSIX and Windows), so a crash in the
middle of a save leaves the previous checkpoint intact. The temporary file
(``.tmp-*``) is removed on any exception, Ctrl-C included; one left by a
process killed outright (``kill -9``, power loss) is removed by
:func:`remove_stale_temp_files` when the next training run starts. Every file
gets the permissions an ordinary ``open()`` would give it (0666 less the umask).
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import zipfile
import zlib
from contextlib import contextmanager

import numpy as np

JSON_PREFIX = "__json__/"
TEMP_PREFIX = ".tmp-"


def _default_mode() -> int:
    """0666 less the umask: what ``open(path, "w")`` creates (mkstemp would give 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a temporary file next to ``path``; on success it replaces ``path`` in one rename.

    On any exception (Ctrl-C included) the temporary file is removed and
    ``path`` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temp_files(folder: str) -> list[str]:
    """Remove ``.tmp-*`` files left in ``folder`` by a process that was killed while saving.

    Call it only while holding the folder's lock (a live writer's file would go too).
    """
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), TEMP_PREFIX + "*")):
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def save_npz_atomic(path: str, arrays: dict, meta: dict | None = None) -> None:
    """Write ``arrays`` (name -> ndarray) and ``meta`` (name -> JSON-able) to ``path``."""
    payload = {}
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype == object:
            raise ValueError(f"checkpoint entry {name!r} is an object array; only numeric arrays are stored")
        payload[name] = a
    for name, value in (meta or {}).items():
        payload[JSON_PREFIX + name] = np.frombuffer(json.dumps(value).encode("utf-8"), dtype=np.uint8)
    with atomic_write(path) as f:
        np.savez(f, **payload)


def load_npz(path: str) -> tuple[dict, dict]:
    """Read a checkpoint: (arrays, meta).

    Raises FileNotFoundError if there is no file, ValueError naming the
    problem for anything that is not a readable tinymrcnn ``.npz``. Pickled
    data is never loaded: unpickling can run arbitrary code.
    """
    if os.path.isdir(path):
        raise ValueError(
            f"{path} is a folder; give the checkpoint file inside it (e.g. {os.path.join(path, 'checkpoint.npz')})"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":  # every .npz is a zip archive
        what = "it is empty" if not head else "it is not a .npz archive"
        raise ValueError(f"{path} is not a checkpoint: {what} (corrupt, or a different kind of file)")
    arrays, meta = {}, {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                try:
                    value = z[name]
                except ValueError as e:
                    if "pickle" in str(e):  # numpy: an object array needs allow_pickle
                        raise ValueError(
                            f"{path} is not a tinymrcnn checkpoint: entry {name!r} holds pickled "
                            "Python objects, which are never loaded (unpickling can run code)"
                        ) from None
                    raise ValueError(f"corrupt checkpoint {path}: entry {name!r} is unreadable ({e})") from None
                if name.startswith(JSON_PREFIX):
                    try:
                        meta[name[len(JSON_PREFIX) :]] = json.loads(value.tobytes().decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise ValueError(
                            f"corrupt checkpoint {path}: unreadable metadata {name[len(JSON_PREFIX) :]!r} ({e})"
                        ) from None
                else:
                    arrays[name] = value
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"corrupt checkpoint {path} (truncated or damaged: {e})") from None
    return arrays, meta
