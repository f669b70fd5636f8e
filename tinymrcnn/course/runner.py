"""Runs the grader's calls against a student's package, in a separate interpreter.

This file is executed as a script (``python runner.py STUDENT_DIR CALLS RESULTS``)
with ``PYTHONPATH=STUDENT_DIR``, from a scratch folder, by
``tinymrcnn.course.grade``; it imports nothing of the installed package, so
the student's code never mixes with the solution. It only *calls*: the
grader, in its own process, compares the results with the solution's.

CALLS is a pickle of a list of dicts:
    id, target ("module:qualname"), args, kwargs,
    init (args, kwargs) to construct the class of a method target, or None,
    numgrad None or {"wrt": argument index, "h": step, "output": index of the
        loss in a tuple result or None}: also return the centred-difference
        gradient of the (scalar) loss with respect to that argument.
Each result is written to RESULTS/<id>.pkl as soon as it is known, so that a
call that hangs costs only the calls after it:
    {"ok": True, "value": ..., "numgrad": ...}
    {"ok": False, "error": type name, "message": str, "where": [(file, line, function)]}
Values are reduced to NumPy arrays and plain Python containers and scalars.
"""
import importlib
import os
import pickle
import sys
import traceback

import numpy as np


def _plain(v, depth=0):
    """Reduce a result to arrays, numbers, strings, None and lists/tuples/dicts of them."""
    if depth > 6:
        return {"__unplain__": type(v).__name__, "repr": repr(v)[:200]}
    if v is None or isinstance(v, (bool, int, float, complex, str)):
        return v
    if isinstance(v, np.generic):
        return v.item() if v.dtype.kind != "f" else v          # keep the float dtype of scalars
    if isinstance(v, np.ndarray):
        return np.array(v, copy=True) if v.dtype != object else {"__unplain__": "object array",
                                                                  "repr": repr(v)[:200]}
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
    if init is not None:                      # "Class.method": construct, then bind
        cls = obj
        for p in parts[:-1]:
            cls = getattr(cls, p)
        return getattr(cls(*init[0], **init[1]), parts[-1])
    for p in parts:
        obj = getattr(obj, p)
    return obj


def _numgrad(fn, args, kwargs, wrt, h, output):
    """Centred differences of the scalar fn(...)[output] with respect to args[wrt] (float64)."""
    x = args[wrt]
    grad = np.zeros(x.shape, dtype=np.float64)

    def loss():
        out = fn(*args, **kwargs)
        return float(out if output is None else out[output])

    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + h
        fp = loss()
        x[idx] = old - h
        fm = loss()
        x[idx] = old
        grad[idx] = (fp - fm) / (2 * h)
    return grad


def _where(tb, student_dir):
    """The traceback frames inside the student's package: (file relative to it, line, function)."""
    frames = []
    for fs in traceback.extract_tb(tb):
        path = os.path.realpath(fs.filename)
        if path.startswith(student_dir + os.sep):
            frames.append((os.path.relpath(path, student_dir), fs.lineno, fs.name))
    return frames


def main(student_dir, calls_path, results_dir):
    student_dir = os.path.realpath(student_dir)
    try:
        import tinymrcnn
        where = os.path.realpath(tinymrcnn.__file__)
        if not where.startswith(student_dir + os.sep):
            raise ImportError(f"'import tinymrcnn' found {where}, not the package in {student_dir}")
    except BaseException as e:  # noqa: BLE001 -- any failure to import is reported, not raised
        with open(os.path.join(results_dir, "import.pkl"), "wb") as f:
            pickle.dump({"ok": False, "error": type(e).__name__, "message": str(e)[:2000],
                         "where": _where(e.__traceback__, student_dir)}, f)
        return 3
    with open(calls_path, "rb") as f:
        calls = pickle.load(f)
    np.seterr(all="ignore")                   # a student's overflow is judged by its result, not a warning
    for call in calls:
        try:
            fn = _resolve(call["target"], call.get("init"))
            value = fn(*call["args"], **call["kwargs"])
            res = {"ok": True, "value": _plain(value)}
            ng = call.get("numgrad")
            if ng is not None:
                res["numgrad"] = _numgrad(fn, list(call["args"]), call["kwargs"], ng["wrt"], ng["h"],
                                          ng.get("output"))
        except Exception as e:  # noqa: BLE001 -- the student's exception is the result
            res = {"ok": False, "error": type(e).__name__, "message": str(e)[:2000],
                   "where": _where(e.__traceback__, student_dir)}
        with open(os.path.join(results_dir, f"{call['id']}.pkl"), "wb") as f:
            pickle.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
