"""Exercise checks: what the exercise notebook's visible tests call.

Each raises an AssertionError whose message says what was expected, what came out and,
with ``hint``, where to look. Grading does not trust these: hidden tests are judged
outside the student's process.
"""
from __future__ import annotations

import sys

import numpy as np


def _as_numbers(value, name):
    """``value`` (array, tensor, list or number) as a float64 array, or AssertionError."""
    if value is None:
        raise AssertionError(f"{name} returned None: did you forget the `return` statement?")
    if hasattr(value, "numpy"):
        value = value.numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise AssertionError(
            f"{name} should be an array of numbers, got {type(value).__name__}."
        ) from None
    return arr


def check_array(value, name, shape=None, low=None, high=None):
    """Check that ``value`` is a finite array [of ``shape``] [within ``low``..``high``].

    Returns it as a float64 NumPy array. Raises ``AssertionError`` with a message
    naming ``name``, the expected and the actual shape or range otherwise.
    """
    arr = _as_numbers(value, name)
    if shape is not None and arr.shape != tuple(shape):
        raise AssertionError(f"{name} should have shape {tuple(shape)}, got {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise AssertionError(f"{name} contains {bad} NaN or infinite value(s).")
    if low is not None and arr.size and arr.min() < low:
        raise AssertionError(f"{name} should be >= {low}, but its minimum is {arr.min():.6g}.")
    if high is not None and arr.size and arr.max() > high:
        raise AssertionError(f"{name} should be <= {high}, but its maximum is {arr.max():.6g}.")
    return arr


def check_close(actual, expected, name, rtol=1e-5, atol=1e-8, hint=""):
    """Check ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    On failure the ``AssertionError`` says how many values differ, the largest
    difference, where it is and both values there, followed by ``hint``.
    Returns None (so that a test cell ending with it prints nothing).
    """
    try:
        exp = np.asarray(expected, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"expected (the reference for {name}) must be numbers, got {type(expected).__name__}.") from None
    act = check_array(actual, name)
    if act.shape != exp.shape:
        if act.size == exp.size == 1:
            act = act.reshape(exp.shape)
        else:
            raise AssertionError(f"{name} should have shape {exp.shape}, got {act.shape}. {hint}".strip())
    bad = np.abs(act - exp) > atol + rtol * np.abs(exp)
    if np.any(bad):
        diff = np.where(bad, np.abs(act - exp), -np.inf)
        where = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.ndim else ()
        at = f" at index {tuple(int(i) for i in where)}" if where else ""
        raise AssertionError(
            f"{name} is wrong in {int(bad.sum())} of {bad.size} value(s); the largest difference is "
            f"{np.abs(act - exp)[where]:.6g}{at} (got {act[where]:.6g}, expected {exp[where]:.6g}). {hint}".strip()
        )


def check_visible(fig, artist, name, min_pixels=20):
    """Check that ``artist`` (e.g. a line) changes at least ``min_pixels`` pixels of ``fig``.

    The figure is drawn twice, with the artist shown and hidden, and the pixels compared:
    an invisible, transparent, zero-width, off-axes or covered artist changes none.
    Returns the number of changed pixels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def pixels():
        canvas = fig.canvas if hasattr(fig.canvas, "buffer_rgba") else FigureCanvasAgg(fig)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba()).copy()

    shown = artist.get_visible()
    with_artist = pixels()
    artist.set_visible(False)
    try:
        without = pixels()
    finally:
        artist.set_visible(shown)
    changed = int(np.any(with_artist != without, axis=-1).sum())
    if changed < min_pixels:
        raise AssertionError(
            f"{name} cannot be seen in the figure (drawing it changes {changed} pixels): check that it is "
            "visible, not transparent, has a width or markers, and lies inside the axes limits.")
    return changed


def _code_objects(code):
    """A code object and every code object nested in it (inner functions, comprehensions)."""
    yield code
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            yield from _code_objects(const)


def check_not_calling(func, forbidden, name, args=(), kwargs=None):
    """Call ``func(*args, **kwargs)`` and fail if it uses one of the ``forbidden`` functions.

    Two checks, so that renaming does not help (``from cnn_utils import grad_cam as g``):
    the code is inspected, following every global name, attribute and closure it
    references into the functions it calls (a reference to a forbidden function under any
    name fails); and the call runs under ``sys.setprofile``, which sees every Python
    function entered, however it was reached. Returns the call's result.
    """
    import inspect

    forbidden = list(forbidden)
    codes = {inspect.unwrap(f).__code__ for f in forbidden if hasattr(inspect.unwrap(f), "__code__")}
    names = {f.__name__ for f in forbidden}

    def is_forbidden(obj):
        try:
            return any(obj is f for f in forbidden) or getattr(inspect.unwrap(obj), "__code__", None) in codes
        except Exception:
            return False

    seen, todo = set(), [func]
    while todo:
        f = todo.pop()
        f = getattr(f, "__func__", f)
        if id(f) in seen or not hasattr(f, "__code__"):
            continue
        seen.add(id(f))
        if is_forbidden(f):
            raise AssertionError(f"{name} uses {f.__name__} from cnn_utils: write the method yourself.")
        env = getattr(f, "__globals__", {})
        referenced = [c.cell_contents for c in (f.__closure__ or ()) if _cell_filled(c)]
        for code in _code_objects(f.__code__):
            for n in code.co_names:
                if n in env:
                    referenced.append(env[n])
                    module = env[n]
                    if inspect.ismodule(module):
                        referenced.extend(getattr(module, m) for m in code.co_names if m in names
                                          and hasattr(module, m))
        for obj in referenced:
            if is_forbidden(obj):
                raise AssertionError(
                    f"{name} refers to cnn_utils.{getattr(obj, '__name__', obj)} (under whatever name): "
                    "the exercise is to write the method yourself, without the course's implementation.")
            if getattr(getattr(obj, "__func__", obj), "__globals__", None) is env:
                todo.append(obj)  # the student's own helper functions, not library code

    called = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            called.append(frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = func(*args, **(kwargs or {}))
    finally:
        sys.setprofile(previous)
        if called:
            raise AssertionError(f"{name} called cnn_utils.{called[0]}: the exercise is to write the "
                                 "method yourself, without the course's implementation.")
    return result


def _cell_filled(cell):
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True
