"""What runs inside the grading sandbox (``cnnlib/grading.py`` starts it; never imported by the grader).

Nothing here is trusted, and nothing here decides a grade. The worker (``main``) runs as the
sandbox's process 1, executes the submitted notebook cell by cell in a Jupyter kernel (the
student's code runs only in that kernel), and where a test cell stood it asks the kernel to call
the student's functions with the grader's inputs (``run_calls``). What goes back to the grader on
its one result pipe (a descriptor held by this process only; the process is not dumpable,
so the kernel cannot open it through ``/proc``) is data: JSON lines holding text, numbers and
``.npy`` arrays (read by the grader with ``allow_pickle=False``). The grader judges that data
with its own reference code; whatever the submission does in here, it can only change the data.

Run as ``python grading_sandbox.py`` with the job (JSON) on stdin.
"""
import base64
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

#: Characters kept of a cell's text outputs, and bytes of its images (the grader cuts too).
OUTPUT_CHARS = 20_000
IMAGE_BYTES = 4_000_000
#: Bytes of one result array; a larger one is refused.
ARRAY_BYTES = 20_000_000
#: Where the grader's inputs and the kernel's answers live inside the sandbox.
JOB_DIR = Path(os.environ.get("CNN_COURSE_GRADER_JOB", "/tmp/grader-job"))


# ---------------------------------------------------------------------------
# In the kernel: call the student's functions with the grader's inputs
# ---------------------------------------------------------------------------

def _decode(value, arrays, namespace):
    """A call argument from its JSON form: {"array": key}, {"name": notebook name}, {"dense_model": key},
    lists, tuples."""
    if isinstance(value, dict):
        if "array" in value:
            return arrays[value["array"]].copy()
        if "name" in value:
            return namespace[value["name"]]
        if "dense_model" in value:  # a Keras model: Flatten, then Dense without bias, with these weights
            import keras

            weights = arrays[value["dense_model"]]
            inputs = keras.Input(tuple(value["input_shape"]))
            dense = keras.layers.Dense(weights.shape[1], use_bias=False)
            model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
            dense.set_weights([weights])
            return model
        if "tuple" in value:
            return tuple(_decode(v, arrays, namespace) for v in value["tuple"])
        return {k: _decode(v, arrays, namespace) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays, namespace) for v in value]
    return value


def _as_array(value):
    import numpy as np

    if value is None:
        raise TypeError("returned None (a missing `return`?)")
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"returned {type(value).__name__}, not an array of numbers")
    if array.nbytes > ARRAY_BYTES:
        raise ValueError(f"returned an array of {array.nbytes} bytes (limit {ARRAY_BYTES})")
    return array


def _figure_data(fig):
    """What the grader needs of a figure: labels, title, the first line's data, two renderings."""
    import matplotlib.figure
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig, matplotlib.figure.Figure):
        return {"type": type(fig).__name__}
    out = {"type": "Figure", "axes": len(fig.axes), "suptitle": fig.get_suptitle() if hasattr(fig, "get_suptitle")
           else (fig._suptitle.get_text() if fig._suptitle else "")}
    if fig.axes:
        ax = fig.axes[0]
        out.update(xlabel=ax.get_xlabel(), ylabel=ax.get_ylabel(), title=ax.get_title(), lines=len(ax.lines))
        if ax.lines:
            line = ax.lines[0]
            out["xdata"] = np.asarray(line.get_xdata(), float)
            out["ydata"] = np.asarray(line.get_ydata(), float)
            canvas = FigureCanvasAgg(fig)
            fig.set_dpi(50)
            canvas.draw()
            out["with_line"] = np.asarray(canvas.buffer_rgba()).copy()
            shown = line.get_visible()
            line.set_visible(False)
            canvas.draw()
            out["without_line"] = np.asarray(canvas.buffer_rgba()).copy()
            line.set_visible(shown)
    return out


def _gradient(func, args, kwargs):
    """Gradient of sum(func(variable, ...)) with respect to the first argument (None: not built from tf ops)."""
    import tensorflow as tf

    v = tf.Variable(args[0])
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(func(v, *args[1:], **kwargs))
    g = tape.gradient(total, v)
    return None if g is None else g.numpy()


def run_calls(namespace, name):
    """Run the grader's calls for one test (``JOB_DIR/<name>.json``) and write the answers
    (``<name>.out.json`` and arrays in ``<name>.out.npz``). Prints nothing."""
    import numpy as np

    spec = json.loads((JOB_DIR / f"{name}.json").read_text())
    with np.load(JOB_DIR / "inputs.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    answers, out_arrays = [], {}
    for i, call in enumerate(spec["calls"]):
        answer = {}
        try:
            if call.get("kind") == "name":
                value = namespace.get(call["name"])
                answer["text"] = value if isinstance(value, str) else repr(type(value).__name__)
                answer["text"] = answer["text"][:200]
            else:
                func = namespace.get(call["fn"])
                if not callable(func):
                    raise NameError(f"{call['fn']} is not defined (run its cell)")
                args = _decode(call.get("args", []), arrays, namespace)
                kwargs = _decode(call.get("kwargs", {}), arrays, namespace)
                if call.get("kind") == "gradient":
                    g = _gradient(func, args, kwargs)
                    answer["none"] = g is None
                    if g is not None:
                        out_arrays[f"{i}"] = _as_array(g)
                elif call.get("kind") == "figure":
                    data = _figure_data(func(*args, **kwargs))
                    import matplotlib.pyplot as plt

                    plt.close("all")
                    for key, value in data.items():
                        if isinstance(value, np.ndarray):
                            out_arrays[f"{i}.{key}"] = _as_array(value)
                        else:
                            answer[key] = value if not isinstance(value, str) else value[:200]
                else:
                    out_arrays[f"{i}"] = _as_array(func(*args, **kwargs))
        except BaseException as err:  # the student's error, reported as data
            answer = {"error": f"{type(err).__name__}: {str(err)[:300]}".rstrip(": ")}
        answers.append(answer)
    np.savez(JOB_DIR / "out" / f"{name}.npz", **out_arrays)
    (JOB_DIR / "out" / f"{name}.json").write_text(json.dumps(answers))


# ---------------------------------------------------------------------------
# The worker: the sandbox's process 1
# ---------------------------------------------------------------------------

class _Channel:
    """The result pipe (the grader's descriptor ``fd``), moved to one the kernel does not inherit."""

    def __init__(self, fd, max_bytes):
        fd, inherited = os.dup(fd), fd     # os.dup: not inheritable
        os.close(inherited)
        self.stream = os.fdopen(fd, "w", buffering=1)
        self.left = max_bytes

    def send(self, **message):
        line = json.dumps(message) + "\n"
        self.left -= len(line)
        if self.left < 0:
            raise OverflowError("the sandbox's answers exceed their size limit")
        self.stream.write(line)
        self.stream.flush()


def _cut_outputs(outputs):
    """A cell's outputs with text cut to OUTPUT_CHARS characters and big images dropped."""
    kept, chars, image_bytes = [], 0, 0
    for out in outputs:
        out = dict(out)
        if out.get("output_type") == "stream":
            text = out.get("text", "")
            out["text"] = text[:max(0, OUTPUT_CHARS - chars)]
            chars += len(out["text"])
            if len(text) > len(out["text"]):
                out["text"] += f"\n[output cut: more than {OUTPUT_CHARS} characters]\n"
        elif out.get("output_type") in ("display_data", "execute_result"):
            data = {}
            for mime, value in out.get("data", {}).items():
                text = value if isinstance(value, str) else json.dumps(value)
                if mime.startswith("image/") and image_bytes + len(text) <= IMAGE_BYTES:
                    data[mime] = value
                    image_bytes += len(text)
                elif not mime.startswith("image/") and chars + len(text) <= OUTPUT_CHARS:
                    data[mime] = value
                    chars += len(text)
            if not data:
                data = {"text/plain": "[output removed: too large]"}
            out["data"] = data
        elif out.get("output_type") == "error":
            out["evalue"] = str(out.get("evalue", ""))[:1000]
            out["traceback"] = [str(t)[:2000] for t in out.get("traceback", [])[-20:]]
        kept.append(out)
    return kept


def _answers(name):
    """The kernel's answers for one test, as JSON-ready data (arrays as base64 ``.npy``)."""
    import numpy as np

    out = JOB_DIR / "out"
    try:
        answers = json.loads((out / f"{name}.json").read_text())
        arrays = {}
        with np.load(out / f"{name}.npz", allow_pickle=False) as npz:
            for key in npz.files:
                buf = io.BytesIO()
                np.save(buf, npz[key], allow_pickle=False)
                arrays[key] = base64.b64encode(buf.getvalue()).decode()
        return {"answers": answers, "arrays": arrays}
    except Exception as err:  # no answers (the cell was stopped, the files removed, ...)
        return {"answers": None, "arrays": {}, "error": f"{type(err).__name__}: {str(err)[:200]}"}


def main():
    import ctypes

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)     # PR_SET_DUMPABLE = 0: no /proc/1/fd, no ptrace
    except (OSError, AttributeError):
        pass
    job = json.loads(sys.stdin.read())
    channel = _Channel(job["channel_fd"], job["max_bytes"])
    os.dup2(2, 1)                                  # anything else printed goes to the log
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    (JOB_DIR / "out").mkdir(parents=True, exist_ok=True)
    for name, spec in job["calls"].items():
        (JOB_DIR / f"{name}.json").write_text(json.dumps(spec))
    import numpy as np

    inputs = {k: np.load(io.BytesIO(base64.b64decode(v)), allow_pickle=False) for k, v in job["arrays"].items()}
    np.savez(JOB_DIR / "inputs.npz", **inputs)
    nb = nbformat.from_dict(job["notebook"])
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    threads = str(job.get("threads", 1))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="agg", TF_NUM_INTEROP_THREADS="1",
               TF_NUM_INTRAOP_THREADS=threads, OMP_NUM_THREADS=threads, PYTHONDONTWRITEBYTECODE="1")
    timeout_message = f"the cell ran past the {job['cell_timeout']} s limit and was interrupted"
    client = NotebookClient(nb, timeout=job["cell_timeout"], interrupt_on_timeout=True, allow_errors=True,
                            kernel_name="python3", resources={"metadata": {"path": str(workdir)}},
                            record_timing=False, startup_timeout=120, shutdown_kernel="immediate",
                            error_on_timeout={"ename": "CellTimeoutError", "evalue": timeout_message,
                                              "traceback": [f"CellTimeoutError: {timeout_message}"]})
    replies = {}
    client.on_cell_executed = lambda **kw: replies.__setitem__("last", kw["execute_reply"].get("content", {}))

    def run(cell, index, timeout=None, **kwargs):
        """Execute one cell; True when it ran past its limit."""
        replies.clear()
        client.timeout, saved = timeout or client.timeout, client.timeout
        try:
            client.execute_cell(cell, index, **kwargs)
        finally:
            client.timeout = saved
        return replies.get("last", {}).get("ename") == "CellTimeoutError"

    cells = list(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(""))   # nbclient stores each cell it runs at its index:
    scratch = len(nb.cells) - 1                      # the grader's own cells go here, not over the last one

    def hidden(code, timeout=None):
        cell = nbformat.v4.new_code_cell(code)
        cell.timed_out = run(cell, scratch, timeout=timeout, store_history=False)
        return cell

    def alive_after(timed_out, index):
        if timed_out and hidden("1", timeout=20).timed_out:
            raise TimeoutError(f"cell {index} ran past the {job['cell_timeout']} s limit and could not be "
                               "interrupted (e.g. a loop in compiled code); the kernel was stopped")

    status, reason, index = "graded", "", -1
    started = time.perf_counter()
    with client.setup_kernel(env=env, cwd=str(workdir)):
        try:
            hidden(f"import sys as _sys; _sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                   "import grading_sandbox as _grader; del _sys", timeout=60)
            channel.send(kind="setup", seconds=round(time.perf_counter() - started, 2))
            for index, cell in enumerate(cells):
                if cell.cell_type != "code":
                    continue
                test = cell.metadata.get("grader_test")
                started = time.perf_counter()
                if test:                           # the grader's calls where the test cell stood
                    cell = nbformat.v4.new_code_cell(f"_grader.run_calls(get_ipython().user_ns, {test!r})")
                    timed_out = run(cell, scratch, store_history=False)
                    channel.send(kind="test", index=index, name=test, timed_out=timed_out, **_answers(test))
                    alive_after(timed_out, index)
                    continue
                timed_out = run(cell, index)
                channel.send(kind="cell", index=index, outputs=_cut_outputs(cell.outputs),
                             count=cell.execution_count, seconds=round(time.perf_counter() - started, 2))
                alive_after(timed_out, index)
                if job.get("fast") and "parameters" in cell.metadata.get("tags", []):
                    hidden("FAST = True  # the grader draws the demonstration figures small")
        except DeadKernelError:
            status, reason = "failed", (f"the kernel died while running cell {index} "
                                        "(e.g. os._exit, a crash or too much memory)")
        except (TimeoutError, OverflowError) as err:
            status, reason = "failed", str(err)
        except Exception as err:  # the grader's own trouble inside the sandbox: report it, never hang
            status, reason = "failed", f"{type(err).__name__}: {err}"
        finally:
            try:
                client.km.kill_kernel() if status == "failed" else None
            except Exception:
                pass
    try:
        channel.send(kind="end", status=status, reason=reason[:500])
    except OverflowError:
        pass


if __name__ == "__main__":
    main()
