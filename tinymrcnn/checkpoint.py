"""Checkpoints as .npz files: written atomically, read without pickle.

A checkpoint is a plain NumPy ``.npz`` archive of named arrays. Text
(the config, training state) is stored as a JSON string inside a uint8
array under a ``__json__/`` key, so loading never needs ``allow_pickle``.

Writing goes to a temporary file in the same folder and is then renamed over
the target (``os.replace`` is atomic on POSIX and Windows), so a crash in the
middle of a save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

JSON_PREFIX = "__json__/"


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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_npz(path: str) -> tuple[dict, dict]:
    """Read a checkpoint: (arrays, meta). Raises ValueError for a corrupt or unsafe file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    arrays, meta = {}, {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                value = z[name]
                if name.startswith(JSON_PREFIX):
                    meta[name[len(JSON_PREFIX):]] = json.loads(value.tobytes().decode("utf-8"))
                else:
                    arrays[name] = value
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"corrupt checkpoint {path}: {e}") from None
    except ValueError as e:
        # numpy raises ValueError for object arrays when allow_pickle=False.
        raise ValueError(f"refusing checkpoint {path}: it is not a plain-array .npz ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt checkpoint {path}: unreadable metadata ({e})") from None
    return arrays, meta
