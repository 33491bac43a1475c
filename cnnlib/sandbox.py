"""The grading sandbox, seen from the grader: bubblewrap's command, what it mounts, the limits,
running one notebook in it and reading back only data; the course files' hashes.

What runs inside is ``cnnlib/grading_sandbox.py`` (and, for exercise 4's own-work test,
``cnnlib/grading_ownwork.py``); the verdicts are decided in ``cnnlib/grading.py``, outside.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from .data import DATA_ENV_VAR, PROJECT_DIR, dataset_search_paths

#: Limits per submission (nbgrader_config.py can change them).
CELL_TIMEOUT = 120
NOTEBOOK_TIMEOUT = 900
MEMORY_LIMIT_MB = 6144
TMP_LIMIT_MB = 256          # the sandbox's /tmp (memory-backed): part of what a submission may use
PROCESS_LIMIT = 512         # processes and threads of the sandbox's user (a kernel with TensorFlow: about 60)
CHANNEL_BYTES = 64 * 2 ** 20
#: The course files a submission must not change (checked by hash after grading).
PROTECTED_PATHS = ("cnn_utils.py", "cnnlib", "course.py", "nbgrader_config.py", "saved_models", "data", "instructors")
#: What a graded notebook may see of the course: mounted read-only at /course, or copied.
RUNTIME_FILES = ("cnn_utils.py", "cnnlib", "course.py", "saved_models")
SANDBOX_COURSE = "/course"                 # where the sandbox sees the course's runtime files
SANDBOX_DATA = "/data"                     # ... and the datasets
SANDBOX_GRADER = "/grader"                 # ... and grading_sandbox.py
SANDBOX_WORKDIR = "/tmp/work"
SANDBOX_UID = 65534                        # when the grader is root, the sandbox runs as nobody


def course_file_hashes(root=PROJECT_DIR):
    """SHA-256 of every course file a submission could try to change, by relative path (Python's
    ``__pycache__`` folders left out: importing writes them)."""
    import hashlib

    hashes = {}
    data_dir = os.environ.get(DATA_ENV_VAR)
    roots = [(root / p, p) for p in PROTECTED_PATHS]
    if data_dir:
        roots.append((Path(data_dir), "$CNN_COURSE_DATA"))
    for path, label in roots:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and
                                                     "__pycache__" not in p.parts) if path.is_dir() else []
        for f in files:
            name = label if f == path else f"{label}/{f.relative_to(path)}"
            hashes[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashes


def changed_course_files(before):
    """The course files added, changed or removed since ``before = course_file_hashes()``, sorted."""
    after = course_file_hashes()
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def sandbox_available():
    """True when bubblewrap (``bwrap``) can start the grading sandbox on this machine and
    ``$CNN_COURSE_SANDBOX`` is not ``none`` (grading then uses a private copy of the course)."""
    global _SANDBOX_OK
    if os.environ.get("CNN_COURSE_SANDBOX", "").lower() == "none":
        return False
    if _SANDBOX_OK is None:
        _SANDBOX_OK = bool(shutil.which("bwrap")) and subprocess.run(
            sandbox_command(["/bin/true"], binds=[]), capture_output=True, env={}).returncode == 0
    return _SANDBOX_OK


_SANDBOX_OK = None
#: What the sandbox sees of /etc: what the dynamic linker, locales and time zones need.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "hosts", "alternatives",
             "fonts", "mime.types", "ssl/certs")


def _system_binds():
    """(source, destination, kind) of the system and the Python environment, read-only."""
    import site

    binds = []
    for top in ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin"):
        path = Path(top)
        if path.is_symlink():
            binds.append((os.readlink(path), top, "symlink"))
        elif path.is_dir():
            binds.append((top, top, "ro"))
    binds += [(f"/etc/{name}", f"/etc/{name}", "ro") for name in ETC_FILES if Path("/etc", name).exists()]
    for path in (sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent),
                 *site.getsitepackages()):
        if Path(path).exists() and not path.startswith("/usr/"):
            binds.append((str(Path(path).resolve()), str(Path(path).resolve()), "ro"))
            if str(Path(path)) != str(Path(path).resolve()):
                binds.append((str(Path(path).resolve()), str(Path(path)), "ro"))
    return binds


def course_binds(own_work=False, root=None, data_dir=None):
    """(source, destination) of the course's runtime files in the sandbox (read-only): the course at
    /course, the datasets at /data, the sandbox's own code at /grader; from ``root`` (default: the
    course) and ``data_dir`` (default: where ``load_dataset`` finds them). ``own_work``: only the
    MNIST model, the MNIST test data and ``grading_ownwork.py`` as the one ``cnn_utils.py``."""
    root = Path(root or PROJECT_DIR)

    def dataset(name):
        paths = [Path(data_dir) / f"{name}.npz"] if data_dir else dataset_search_paths(name)
        return next((p.resolve() for p in paths if p.is_file()), None)

    binds = [(str(root / "cnnlib" / "grading_sandbox.py"), f"{SANDBOX_GRADER}/grading_sandbox.py")]
    if own_work:
        binds += [(str(root / "cnnlib" / "grading_ownwork.py"), f"{SANDBOX_COURSE}/cnn_utils.py"),
                  (str(root / "saved_models" / "mnist_cnn.keras"), f"{SANDBOX_COURSE}/saved_models/mnist_cnn.keras")]
        names = ("mnist",)
    else:
        binds += [(str(root / name), f"{SANDBOX_COURSE}/{name}") for name in RUNTIME_FILES if (root / name).exists()]
        names = ("mnist", "fashion_mnist")
    return binds + [(str(dataset(n)), f"{SANDBOX_DATA}/{n}.npz") for n in names if dataset(n)]


def _readable_by_all(path):
    """True when every folder above ``path`` lets anyone through and ``path`` lets anyone read."""
    import stat

    path = Path(path).resolve()
    if not path.exists() or not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)


_STAGED = None


def staged_course():
    """``(root, data_dir)`` the sandbox mounts: when it runs as another user (the grader is root), a
    read-only copy readable by anyone, made once per grading process (the course may sit in a
    private folder, e.g. under a private /tmp); else the course itself (``(None, None)``)."""
    global _STAGED
    if not _sandbox_user():
        return None, None
    if _STAGED is None:
        import atexit
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="cnn-course-grading-"))
        tmp.chmod(0o755)
        _STAGED = private_course_copy(tmp / "course")

        def remove():
            for path in [tmp, *tmp.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o755)
            shutil.rmtree(tmp, ignore_errors=True)
        atexit.register(remove)
    return _STAGED


def _sandbox_user():
    """The user id the sandbox runs as when the grader is root (one per grading job, so that one
    submission's processes cannot use up another's), or None: the grader's own user."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or \
            not all(_readable_by_all(p) for p in (sys.prefix, sys.base_prefix, sys.executable)):
        return None
    return int(os.environ.get("CNN_COURSE_SANDBOX_UID", SANDBOX_UID))


def sandbox_env(threads=1, own_work=False):
    """The whole environment of the sandbox: nothing of the grader's."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp/home",
           "USER": "student", "LOGNAME": "student", "LANG": "C.UTF-8", "PYTHONPATH": SANDBOX_COURSE,
           "CNN_COURSE_DIR": SANDBOX_COURSE, DATA_ENV_VAR: SANDBOX_DATA, "MPLCONFIGDIR": "/tmp/mpl",
           "JUPYTER_RUNTIME_DIR": "/tmp/jupyter", "IPYTHONDIR": "/tmp/ipython", "JUPYTER_PLATFORM_DIRS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": str(threads)}
    if own_work:
        env["CNN_COURSE_OWN_WORK_DIR"] = "/tmp/grader-job"
    return env


def sandbox_command(command, binds=None, env=None, tmp_mb=TMP_LIMIT_MB):
    """``command`` wrapped in bubblewrap (see the module's docstring); ``binds``: (source, destination)
    pairs mounted read-only over the size-limited /tmp (default: the course's runtime files)."""
    binds = course_binds() if binds is None else binds
    args = ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--as-pid-1", "--new-session", "--die-with-parent", "--cap-drop", "ALL",
            "--clearenv", "--size", str(tmp_mb * 2 ** 20), "--tmpfs", "/tmp",
            "--dev", "/dev", "--proc", "/proc", "--dir", "/etc"]
    for source, dest, kind in _system_binds():
        args += ["--symlink", source, dest] if kind == "symlink" else ["--ro-bind-try", source, dest]
    for source, dest in binds:
        args += ["--ro-bind", source, dest]
    for key, value in (env or {}).items():
        args += ["--setenv", key, value]
    args += ["--dir", SANDBOX_WORKDIR, "--chdir", SANDBOX_WORKDIR]
    uid = _sandbox_user()
    if uid is not None:  # root's processes escape RLIMIT_NPROC: the sandbox runs as a user of its own
        args = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + args
    return args + list(command)


def limits_command(memory_mb, processes):
    """``prlimit`` arguments for the limits a sandbox starts with (inherited by every process in it):
    address space, processes and threads of its user, no core files, files up to the /tmp size."""
    if not shutil.which("prlimit"):  # util-linux's; without it only the time and output limits hold
        return []
    return ["prlimit", f"--as={int(memory_mb) * 2 ** 20}", f"--nproc={processes}", "--core=0",
            f"--fsize={TMP_LIMIT_MB * 2 ** 20}", "--"]


def _process_budget():
    """RLIMIT_NPROC counts every process of the sandbox's user: the ones it has now, plus PROCESS_LIMIT."""
    uid = _sandbox_user()
    uid = os.getuid() if uid is None else uid
    count = 0
    for task in Path("/proc").glob("[0-9]*/task/[0-9]*"):
        try:
            count += task.stat().st_uid == uid
        except OSError:
            pass
    return count + PROCESS_LIMIT


def _encode_arrays(arrays):
    out = {}
    for key, value in arrays.items():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        out[key] = base64.b64encode(buf.getvalue()).decode()
    return out


def run_sandboxed(nb, calls, arrays, cell_timeout=CELL_TIMEOUT, notebook_timeout=NOTEBOOK_TIMEOUT,
                  memory_mb=MEMORY_LIMIT_MB, log_path=None, threads=1, fast=True, own_work=False):
    """Run ``nb`` in the sandbox; at each cell with metadata ``grader_test`` (a test's name) the
    sandbox runs ``calls[name]`` (``{"calls": [...]}``) on ``arrays`` (the grader's inputs).

    Returns ``{"cells": {index: {"outputs", "count"}}, "tests": {name: message}, "status",
    "reason", "sandbox", "ran"}``: all of it data from the sandbox, to be judged, never trusted.
    ``status`` is ``failed`` when the kernel died, a cell could not be interrupted, the notebook ran
    past ``notebook_timeout`` seconds or the sandbox sent too much (what arrived is kept).
    """
    import tempfile
    import threading

    use_bwrap = sandbox_available()
    tmp = None
    job = {"notebook": nb, "calls": calls, "arrays": _encode_arrays(arrays), "cell_timeout": cell_timeout,
           "threads": threads, "fast": fast, "max_bytes": CHANNEL_BYTES, "workdir": SANDBOX_WORKDIR}
    env = sandbox_env(threads, own_work)
    if use_bwrap:
        root, data = staged_course()
        command = sandbox_command(["python", f"{SANDBOX_GRADER}/grading_sandbox.py"],
                                  course_binds(own_work, root, data), env)
        before = None
    else:  # a private copy of the course, the grader's user, no isolation
        tmp = Path(tempfile.mkdtemp(prefix="course-grade-"))
        root, data = private_course_copy(tmp / "course", own_work=own_work)
        job["workdir"] = str(tmp / "work")
        env.update(PYTHONPATH=str(root), CNN_COURSE_DIR=str(root), CNN_COURSE_DATA=data, HOME=str(tmp / "home"),
                   MPLCONFIGDIR=str(tmp / "mpl"), JUPYTER_RUNTIME_DIR=str(tmp / "jupyter"),
                   IPYTHONDIR=str(tmp / "ipython"), CNN_COURSE_OWN_WORK_DIR=str(tmp / "grader-job"),
                   CNN_COURSE_OWN_WORK_MODEL=str(root / "saved_models" / "mnist_cnn.keras"),
                   CNN_COURSE_GRADER_JOB=str(tmp / "grader-job"))
        command = [sys.executable, str(root / "cnnlib" / "grading_sandbox.py")]
        before = course_file_hashes()
    read_end, write_end = os.pipe()
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        job["channel_fd"] = write_end
        proc = subprocess.Popen(limits_command(memory_mb, _process_budget()) + command, stdin=subprocess.PIPE,
                                stdout=log, stderr=log, env=env, cwd="/" if use_bwrap else str(tmp),
                                pass_fds=(write_end,), start_new_session=True)
    finally:
        os.close(write_end)
    result = {"cells": {}, "tests": {}, "status": "failed", "ran": False, "sandbox": use_bwrap,
              "reason": "the sandbox ended without a result (see the log beside the scores)"}
    lines, received = [], [0]

    def read():
        with os.fdopen(read_end, "rb") as pipe:
            while True:
                chunk = pipe.readline(CHANNEL_BYTES + 1)
                if not chunk:
                    break
                received[0] += len(chunk)
                if received[0] > CHANNEL_BYTES:
                    lines.append(b'{"kind": "overflow"}')
                    break
                lines.append(chunk)

    def feed():
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    reader, writer = threading.Thread(target=read, daemon=True), threading.Thread(target=feed, daemon=True)
    reader.start()
    writer.start()
    reader.join(notebook_timeout)
    timed_out = reader.is_alive()
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()
    if log_path:
        log.close()
    for line in list(lines):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        kind = message.get("kind")
        if kind == "overflow":
            result["status"], result["reason"] = "failed", f"the sandbox sent more than {CHANNEL_BYTES // 2 ** 20} MB"
            break
        if kind == "setup":
            result["ran"] = True
        elif kind == "cell" and isinstance(message.get("index"), int) and isinstance(message.get("outputs"), list):
            result["cells"][message["index"]] = {"outputs": message["outputs"], "count": message.get("count")}
        elif kind == "test" and message.get("name") in calls:
            result["tests"].setdefault(message["name"], message)
        elif kind == "end":
            result["status"] = "failed" if message.get("status") == "failed" else "graded"
            result["reason"] = str(message.get("reason") or "")[:500]
            break
    if timed_out:
        result["status"], result["reason"] = "failed", f"the notebook ran past its limit of {notebook_timeout} s as a whole"
    if tmp is not None:
        for path in tmp.rglob("*"):  # the private copy is read-only
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(tmp, ignore_errors=True)
        changed = changed_course_files(before)
        if changed:
            result["status"] = "failed"
            result["reason"] = (f"the course files changed while this submission ran ({', '.join(changed)}); "
                                "restore them (git checkout) and grade with bubblewrap installed")
    return result


def private_course_copy(dest, own_work=False):
    """Without bubblewrap: a private, read-only copy of what a graded notebook imports
    (``cnn_utils.py``, ``cnnlib/``, ``course.py``, ``saved_models/``, the datasets; with ``own_work``
    the stand-in ``cnn_utils.py`` of the own-work run), so that a submission that edits the helpers
    changes only its own copy. Returns ``(course_dir, data_dir)``."""
    dest.mkdir(parents=True)
    data = dest / "data"
    data.mkdir()
    for source, target in course_binds(own_work):
        if target.startswith(SANDBOX_GRADER):
            target = f"{SANDBOX_COURSE}/cnnlib/{Path(target).name}"
        target = (data / Path(target).name) if target.startswith(SANDBOX_DATA) else \
            dest / Path(target).relative_to(SANDBOX_COURSE)
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(source).is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif not target.exists():
            shutil.copy2(source, target)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return dest, str(data)
