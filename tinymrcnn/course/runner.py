"""Runs the grader's calls against a student's package, in a separate interpreter.

This file is executed as a script (``python runner.py STUDENT_DIR CALLS RESULTS``)
with ``PYTHONPATH=STUDENT_DIR``, from a scratch folder, by
``tinymrcnn.course.grade``; it imports nothing of the installed package, so
the student's code never mixes with the solution. It only *calls*: the
grader, in its own process, compares the results with the solution's.

The student's code is untrusted, and this process runs it, so everything
this process writes is untrusted too. Nothing crosses between the two
processes as a pickle: values travel as a JSON tree (:func:`encode`) whose
arrays sit in an ``.npz`` file next to it, and the grader reads them back
with :func:`decode` (``np.load(..., allow_pickle=False)``, a fixed set of
tags, bounded size and depth). A crafted result file can at worst give a
wrong score; it cannot run code in the grader. The grader also starts this
process with resource limits (CPU time, address space, file size, no core
files) and a wall-clock timeout; see ``grade._limits``.

CALLS (``CALLS.json`` + ``CALLS.npz``, written by the grader) is a list of dicts:
    id, target ("module:qualname"), args, kwargs,
    init (args, kwargs) to construct the class of a method target, or None,
    numgrad None or {"wrt": argument index, "h": step, "output": index of the
        loss in a tuple result or None}: also return the centred-difference
        gradient of the (scalar) loss with respect to that argument.
Before each call the runner creates RESULTS/<id>.started; each result is
written to RESULTS/<id>.json (+ RESULTS/<id>.npz) as soon as it is known, so
that a call that hangs or is stopped by a limit costs only itself:
    {"ok": True, "value": ..., "numgrad": ...}
    {"ok": False, "error": type name, "message": str, "where": [[file, line, function]]}
Values are reduced to NumPy arrays and plain Python containers and scalars.
"""

import importlib
import json
import os
import sys
import traceback
import zipfile

import numpy as np

MAX_DEPTH = 24  # nesting of a decoded value
MAX_JSON_BYTES = 16 << 20  # a result's JSON part
MAX_NPZ_BYTES = 256 << 20  # a result's arrays
ARRAY_KINDS = "biufcSU"  # bool, integers, floats, complex, bytes, str: no objects


class DecodeError(ValueError):
    """A file that is not a value written by :func:`encode` (or that breaks its limits)."""


# ---------------------------------------------------------------------------
# Values as JSON + arrays
# ---------------------------------------------------------------------------
def encode(value, arrays: dict, depth: int = 0):
    """``value`` as a JSON-able tree; its arrays go to ``arrays`` (name -> ndarray), referenced by name.

    Tags: {"__array__": name}, {"__scalar__": name} (a NumPy scalar, as a 0-d
    array), {"__tuple__": [...]}, {"__dict__": {str: ...}}, {"__complex__": [re, im]},
    {"__unplain__": type name, "repr": text}. Lists, str, int, float, bool and
    None are themselves.
    """
    if depth > MAX_DEPTH:
        return {"__unplain__": type(value).__name__, "repr": "(nested too deep)"}
    if isinstance(value, np.generic):  # before float: np.float64 is a float
        if value.dtype.kind not in ARRAY_KINDS:
            return {"__unplain__": type(value).__name__, "repr": repr(value)[:200]}
        name = f"a{len(arrays)}"
        arrays[name] = np.asarray(value)
        return {"__scalar__": name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, complex):
        return {"__complex__": [value.real, value.imag]}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in ARRAY_KINDS:
            return {"__unplain__": f"{value.dtype} array", "repr": repr(value)[:200]}
        name = f"a{len(arrays)}"
        arrays[name] = np.ascontiguousarray(value)
        return {"__array__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, arrays, depth + 1) for v in value]}
    if isinstance(value, list):
        return [encode(v, arrays, depth + 1) for v in value]
    if isinstance(value, dict):
        if "__unplain__" in value and set(value) <= {"__unplain__", "repr"}:
            return {"__unplain__": str(value["__unplain__"]), "repr": str(value.get("repr", ""))}
        return {"__dict__": {str(k): encode(v, arrays, depth + 1) for k, v in value.items()}}
    return {"__unplain__": type(value).__name__, "repr": repr(value)[:200]}


def decode(tree, arrays, depth: int = 0):
    """The inverse of :func:`encode`; raises DecodeError on anything it did not write."""
    if depth > MAX_DEPTH:
        raise DecodeError("the value is nested too deeply")
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [decode(v, arrays, depth + 1) for v in tree]
    if not isinstance(tree, dict) or len(tree) not in (1, 2):
        raise DecodeError(f"unexpected {type(tree).__name__} in a result")
    if set(tree) == {"__unplain__", "repr"}:
        if not (isinstance(tree["__unplain__"], str) and isinstance(tree["repr"], str)):
            raise DecodeError("malformed __unplain__ entry")
        return {"__unplain__": tree["__unplain__"][:200], "repr": tree["repr"][:200]}
    if len(tree) != 1:
        raise DecodeError(f"unexpected keys {sorted(tree)[:4]} in a result")
    ((tag, body),) = tree.items()
    if tag in ("__array__", "__scalar__"):
        if not isinstance(body, str) or body not in arrays:
            raise DecodeError(f"a result refers to a missing array {str(body)[:40]!r}")
        a = arrays[body]
        if tag == "__scalar__":
            if a.ndim != 0:
                raise DecodeError("a scalar that is not 0-d")
            return a[()]
        return a
    if tag == "__tuple__" and isinstance(body, list):
        return tuple(decode(v, arrays, depth + 1) for v in body)
    if tag == "__dict__" and isinstance(body, dict):
        return {str(k): decode(v, arrays, depth + 1) for k, v in body.items()}
    if (
        tag == "__complex__"
        and isinstance(body, list)
        and len(body) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in body)
    ):
        return complex(body[0], body[1])
    raise DecodeError(f"unknown tag {tag[:40]!r} in a result")


def write_value(path_stem: str, value) -> None:
    """Write ``value`` to PATH_STEM.json (+ PATH_STEM.npz); the .json appears last, atomically."""
    arrays = {}
    tree = encode(value, arrays)
    if arrays:
        tmp = path_stem + ".npz.part"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path_stem + ".npz")
    tmp = path_stem + ".json.part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"arrays": sorted(arrays), "value": tree}, f)
    os.replace(tmp, path_stem + ".json")


def _regular_file(path: str, limit: int) -> None:
    st = os.lstat(path)  # a link is refused, not followed
    if not (st.st_mode & 0o170000 == 0o100000):
        raise DecodeError(f"{os.path.basename(path)} is not a regular file")
    if st.st_size > limit:
        raise DecodeError(f"{os.path.basename(path)} is {st.st_size} bytes, over the limit of {limit}")


def read_value(path_stem: str):
    """Read a value written by :func:`write_value`, trusting nothing in the files.

    Raises FileNotFoundError if PATH_STEM.json does not exist and DecodeError
    for anything else that is wrong with the files (never unpickles).
    """
    jpath = path_stem + ".json"
    if not os.path.lexists(jpath):
        raise FileNotFoundError(jpath)
    _regular_file(jpath, MAX_JSON_BYTES)
    try:
        with open(jpath, encoding="utf-8") as f:
            doc = json.load(f)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise DecodeError(f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict) or set(doc) != {"arrays", "value"} or not isinstance(doc["arrays"], list):
        raise DecodeError("not a result file")
    arrays = {}
    if doc["arrays"]:
        npath = path_stem + ".npz"
        if not os.path.lexists(npath):
            raise DecodeError("the result's arrays are missing")
        _regular_file(npath, MAX_NPZ_BYTES)
        try:
            with zipfile.ZipFile(npath) as zf:  # no zip bomb: the unpacked size counts
                if sum(i.file_size for i in zf.infolist()) > MAX_NPZ_BYTES:
                    raise DecodeError(f"the result's arrays unpack to more than {MAX_NPZ_BYTES} bytes")
            with np.load(npath, allow_pickle=False) as z:
                for name in doc["arrays"]:
                    if not isinstance(name, str) or name not in z.files:
                        raise DecodeError("the result's arrays do not match its JSON")
                    a = z[name]
                    if a.dtype.kind not in ARRAY_KINDS:
                        raise DecodeError(f"an array of dtype {a.dtype}")
                    arrays[name] = a
        except DecodeError:
            raise
        except Exception as e:  # noqa: BLE001 -- e.g. ValueError: Object arrays cannot be loaded ...
            raise DecodeError(f"unreadable arrays ({type(e).__name__}: {str(e)[:120]})") from None
    try:
        return decode(doc["value"], arrays)
    except RecursionError:
        raise DecodeError("the value is nested too deeply") from None


# ---------------------------------------------------------------------------
# Running the calls
# ---------------------------------------------------------------------------
def _plain(v, depth=0):
    """Reduce a result to arrays, numbers, strings, None and lists/tuples/dicts of them."""
    if depth > 6:
        return {"__unplain__": type(v).__name__, "repr": repr(v)[:200]}
    if v is None or isinstance(v, (bool, int, float, complex, str)) and not isinstance(v, np.generic):
        return v
    if isinstance(v, np.generic):
        return v.item() if v.dtype.kind != "f" else v  # keep the float dtype of scalars
    if isinstance(v, np.ndarray):
        return np.array(v, copy=True) if v.dtype != object else {"__unplain__": "object array", "repr": repr(v)[:200]}
    if isinstance(v, (list, tuple)):
        items = [_plain(x, depth + 1) for x in v]
        return items if isinstance(v, list) else tuple(items)
    if isinstance(v, dict):
        return {str(k): _plain(x, depth + 1) for k, x in v.items()}
    return {"__unplain__": type(v).__name__, "repr": repr(v)[:200]}


def _resolve(target, init):
    module, qualname = target.split(":")
    obj = importlib.import_module(module)
    parts = qualname.split(".")
    if init is not None:  # "Class.method": construct, then bind
        cls = obj
        for p in parts[:-1]:
            cls = getattr(cls, p)
        return getattr(cls(*init[0], **init[1]), parts[-1])
    for p in parts:
        obj = getattr(obj, p)
    return obj


def _numgrad(fn, args, kwargs, wrt, h, output):
    """Centred differences of the scalar fn(...)[output] with respect to args[wrt] (float64)."""
    from tinymrcnn.gradcheck import numerical_gradient  # the graded copy's own (the runner runs as a script)

    def loss():
        out = fn(*args, **kwargs)
        return float(out if output is None else out[output])

    return numerical_gradient(loss, args[wrt], h)


def _where(tb, student_dir):
    """The traceback frames inside the student's package: [file relative to it, line, function]."""
    frames = []
    for fs in traceback.extract_tb(tb):
        path = os.path.realpath(fs.filename)
        if path.startswith(student_dir + os.sep):
            frames.append([os.path.relpath(path, student_dir), fs.lineno, fs.name])
    return frames


def _error(e, student_dir):
    name = "MemoryError" if isinstance(e, MemoryError) else type(e).__name__
    return {"ok": False, "error": name, "message": str(e)[:2000], "where": _where(e.__traceback__, student_dir)}


class _NoReference:
    """Import hook: the reference solutions of a student's copy are not importable while grading."""

    def find_spec(self, name, path=None, target=None):
        if name.startswith("tinymrcnn.course.reference"):
            raise ImportError("the reference solutions are not available while grading")


def main(student_dir, calls_stem, results_dir):
    student_dir = os.path.realpath(student_dir)
    calls = read_value(calls_stem)  # written by the grader
    sys.meta_path.insert(0, _NoReference())
    try:
        import tinymrcnn

        where = os.path.realpath(tinymrcnn.__file__)
        if not where.startswith(student_dir + os.sep):
            raise ImportError(f"'import tinymrcnn' found {where}, not the package in {student_dir}")
    except BaseException as e:  # noqa: BLE001 -- any failure to import is reported, not raised
        write_value(os.path.join(results_dir, "import"), _error(e, student_dir))
        return 3
    np.seterr(all="ignore")  # a student's overflow is judged by its result, not a warning
    for call in calls:
        open(os.path.join(results_dir, f"{call['id']}.started"), "w").close()
        try:
            fn = _resolve(call["target"], call.get("init"))
            value = fn(*call["args"], **call["kwargs"])
            res = {"ok": True, "value": _plain(value)}
            ng = call.get("numgrad")
            if ng is not None:
                res["numgrad"] = _numgrad(fn, list(call["args"]), call["kwargs"], ng["wrt"], ng["h"], ng.get("output"))
        except Exception as e:  # noqa: BLE001 -- the student's exception is the result
            res = _error(e, student_dir)
        write_value(os.path.join(results_dir, str(call["id"])), res)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
