"""A class on a real JupyterHub, one full round of the exercises through nbgrader's exchange.

The test starts JupyterHub with the course's ``instructors/jupyterhub_config.py`` (its
LocalProcessSpawner, the ``configurable-http-proxy`` from npm, the dummy authenticator with a
password given on the command line) on loopback ports, with three system users it creates:
an instructor and two students. Everything a user does goes through the hub's REST API (a token
requested with the user's password, their server started) and that user's own server:

* instructor  (commands run in a kernel of their server, in their private clone of the course)
              ``python -m course release``, ``nbgrader release_assignment`` to the exchange
* students    nbgrader's Assignments API of their server: fetch; ``correct`` saves the
              instructors' solutions into the fetched notebook (contents API), ``blank`` leaves it;
              both submit
* instructor  ``nbgrader collect``, then ``python -m course grade nbgrader/submitted`` (the
              course's isolated grading); the scores are read from the instructor's server.

Needs root (``useradd``), the proxy on PATH (``.ci/run`` installs it with npm) and a Python
environment every user can read (``.ci/run`` keeps it outside /root); skips naming what is missing.
"""
import csv
import io
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT

import course

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not course.EXERCISE_SOURCE.is_file(), reason="a copy of the course without instructors/")]

ASSIGNMENT = course.EXERCISE_ASSIGNMENT
COURSE_ID = "cnn-course"
INSTRUCTOR = "cnnhub-teacher"
STUDENTS = {"cnnhub-ada": "correct", "cnnhub-bob": "blank"}
#: What a shared, read-only course installation holds (the students' copy: no instructors/).
STUDENT_COPY = ("cnn_utils.py", "course.py", "nbgrader_config.py", "requirements.txt", "README.md",
                "notebooks", "saved_models", "data/README.md")
HUB_CONFIG = ROOT / "instructors" / "jupyterhub_config.py"


# ---------------------------------------------------------------------------
# What the test needs from the machine
# ---------------------------------------------------------------------------

def _readable_by_all(path):
    """True when any user can reach ``path`` (every parent folder searchable by others)."""
    path = Path(path).resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents] if p.is_dir()) \
        and bool(path.stat().st_mode & stat.S_IROTH)


def _missing_piece():
    """Why the hub cannot run here (None when it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "creating the class's system users needs root"
    if not (shutil.which("useradd") and shutil.which("userdel")):
        return "useradd/userdel are not installed"
    if not shutil.which("configurable-http-proxy"):
        return ("JupyterHub's proxy is not on PATH: `npm install configurable-http-proxy@5.3.0` "
                "and put its node_modules/.bin on PATH (.ci/run does)")
    try:
        import jupyterhub  # noqa: F401
    except ImportError:
        return "jupyterhub is not installed (requirements-dev.txt)"
    for path in (sys.prefix, os.path.realpath(sys.executable)):
        if not _readable_by_all(path):
            return (f"{path} (the course's Python) is in a folder other users cannot pass through, so the "
                    "class's users could not start their servers (.ci/run makes the folders searchable)")
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_course(target, with_instructors):
    """Copy the course's files (the working tree, so uncommitted changes are tested too)."""
    for name in STUDENT_COPY + (("instructors",) if with_instructors else ()):
        src, dst = ROOT / name, target / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        else:
            shutil.copyfile(src, dst)


def _processes_of(uid):
    """Process ids owned by ``uid`` (the class's users' servers and kernels, started by this test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except FileNotFoundError:
                pass
    return pids


# ---------------------------------------------------------------------------
# Talking to the hub and to one user's server
# ---------------------------------------------------------------------------

class UserSession:
    """One hub user: a token requested with the password, their server, its REST and kernel APIs."""

    def __init__(self, hub_url, name, password):
        import requests

        self.http = requests.Session()
        self.hub_url, self.name = hub_url, name
        r = self.http.post(f"{hub_url}/hub/api/users/{name}/tokens",
                           json={"auth": {"username": name, "password": password}, "note": "classroom test"})
        assert r.status_code in (200, 201), f"token for {name}: {r.status_code} {r.text[:300]}"
        self.http.headers["Authorization"] = f"token {r.json()['token']}"
        self.server = f"{hub_url}/user/{name}"

    def start_server(self):
        r = self.http.post(f"{self.hub_url}/hub/api/users/{self.name}/server")
        assert r.status_code in (201, 202), f"starting {self.name}'s server: {r.status_code} {r.text[:300]}"

    def wait_for_server(self, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.http.get(f"{self.hub_url}/hub/api/users/{self.name}").json()
            if model.get("servers", {}).get("", {}).get("ready"):
                return
            time.sleep(1)
        raise AssertionError(f"{self.name}'s server did not start within {timeout} s")

    def stop_server(self):
        self.http.delete(f"{self.hub_url}/hub/api/users/{self.name}/server", timeout=60)

    def api(self, method, path, **kwargs):
        r = self.http.request(method, f"{self.server}/{path}", timeout=120, **kwargs)
        assert r.ok, f"{method} {path} as {self.name}: {r.status_code} {r.text[:500]}"
        return r

    def run(self, argv, cwd, timeout=900):
        """Run a command as this user, in a kernel of their own server; returns (status, output)."""
        import websocket

        kernel = self.api("POST", "api/kernels", json={"name": "python3"}).json()["id"]
        try:
            ws = websocket.create_connection(
                f"{self.server.replace('http', 'ws', 1)}/api/kernels/{kernel}/channels",
                header=[f"Authorization: {self.http.headers['Authorization']}"], timeout=timeout)
            code = ("import json, subprocess\n"
                    f"r = subprocess.run({list(map(str, argv))!r}, cwd={str(cwd)!r}, capture_output=True, text=True)\n"
                    "print(json.dumps([r.returncode, (r.stdout + r.stderr)[-6000:]]))")
            msg_id = uuid.uuid4().hex
            ws.send(json.dumps({"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": self.name,
                                           "session": uuid.uuid4().hex, "version": "5.3"},
                                "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                                "content": {"code": code, "silent": False, "store_history": False,
                                            "user_expressions": {}, "allow_stdin": False}}))
            out, deadline = [], time.monotonic() + timeout
            while time.monotonic() < deadline:
                msg = json.loads(ws.recv())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    out.append(msg["content"]["text"])
                elif msg["msg_type"] == "error":
                    out.append("\n".join(msg["content"]["traceback"]))
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
            ws.close()
        finally:
            self.api("DELETE", f"api/kernels/{kernel}")
        text = "".join(out).strip()
        try:
            status, output = json.loads(text.splitlines()[-1])
        except (IndexError, ValueError):
            raise AssertionError(f"{argv} as {self.name}: no result from the kernel:\n{text[-2000:]}") from None
        return status, output

    def check(self, argv, cwd, timeout=900):
        status, output = self.run(argv, cwd, timeout)
        assert status == 0, f"`{' '.join(map(str, argv))}` as {self.name} exited {status}:\n{output}"
        return output

    def assignments(self, action=None):
        if action is None:
            return self.api("GET", "assignments", params={"course_id": COURSE_ID}).json()
        body = self.api("POST", f"assignments/{action}",
                        json={"course_id": COURSE_ID, "assignment_id": ASSIGNMENT}).json()
        assert body.get("success"), f"{action} as {self.name}: {str(body)[:1000]}"
        return body


# ---------------------------------------------------------------------------
# The hub and the round
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classroom():
    reason = _missing_piece()
    if reason:
        pytest.skip(reason)
    # Not under /tmp: the grading sandbox mounts a private /tmp over it.
    base = Path(tempfile.mkdtemp(prefix="cnn-course-hub-", dir="/var/tmp"))
    base.chmod(0o755)
    users = [INSTRUCTOR, *STUDENTS]
    uids, hub, sessions = {}, None, []
    log = base / "jupyterhub.log"
    try:
        shared = base / "srv" / "cnn-course"
        _copy_course(shared, with_instructors=False)
        data = Path(os.environ.get("CNN_COURSE_DATA") or ROOT / "data")
        if not all((data / f).is_file() and _readable_by_all(data / f) for f in ("mnist.npz",)):
            (shared / "data").mkdir(exist_ok=True)
            for f in ("mnist.npz", "fashion_mnist.npz"):
                if (data / f).is_file():
                    shutil.copyfile(data / f, shared / "data" / f)
            data = shared / "data"
        subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
        for name in users:
            subprocess.run(["userdel", "--remove", name], capture_output=True)  # a leftover of a killed run
            subprocess.run(["useradd", "--create-home", "--home-dir", str(base / "home" / name),
                            "--shell", "/bin/bash", "--user-group", name], check=True, capture_output=True)
            uids[name] = pwd.getpwnam(name).pw_uid
        clone = base / "home" / INSTRUCTOR / "cnn-course"  # the instructor's private clone
        _copy_course(clone, with_instructors=True)
        subprocess.run(["chown", "-R", f"{INSTRUCTOR}:{INSTRUCTOR}", str(clone)], check=True)
        for name in users:
            (base / "home" / name).chmod(0o700)

        password = secrets.token_urlsafe(16)
        port, hub_port, proxy_port = _free_port(), _free_port(), _free_port()
        env = dict(os.environ, CNN_COURSE_HUB_INSTRUCTORS=INSTRUCTOR, CNN_COURSE_HUB_STUDENTS=",".join(STUDENTS),
                   CNN_COURSE_HUB_COURSE_DIR=str(shared), CNN_COURSE_HUB_EXCHANGE=str(base / "exchange"),
                   CNN_COURSE_HUB_COURSE_ID=COURSE_ID, CNN_COURSE_HUB_STATE=str(base / "state"),
                   CNN_COURSE_HUB_URL=f"http://127.0.0.1:{port}", CNN_COURSE_DATA=str(data),
                   CNN_COURSE_OFFLINE="1")
        with log.open("w") as out:
            hub = subprocess.Popen(
                [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(HUB_CONFIG),
                 "--JupyterHub.authenticator_class=dummy", f"--DummyAuthenticator.password={password}",
                 f"--JupyterHub.hub_bind_url=http://127.0.0.1:{hub_port}",
                 f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{proxy_port}"],
                cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        hub_url = f"http://127.0.0.1:{port}"
        import requests

        deadline = time.monotonic() + 120
        while True:
            assert hub.poll() is None, f"JupyterHub exited:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{hub_url}/hub/api/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"JupyterHub did not answer:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        sessions = {name: UserSession(hub_url, name, password) for name in users}
        for s in sessions.values():  # the class logs in at once
            s.start_server()
        for s in sessions.values():
            s.wait_for_server()
        yield {"sessions": sessions, "clone": clone, "base": base, "log": log}
    finally:
        for s in (sessions.values() if isinstance(sessions, dict) else []):
            try:
                s.stop_server()
            except Exception:  # the hub may be gone already; its processes are ended below
                pass
        if hub is not None and hub.poll() is None:
            hub.send_signal(signal.SIGTERM)  # the hub stops the proxy and the servers it started
            try:
                hub.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(hub.pid, signal.SIGKILL)
                hub.wait()
        for name, uid in uids.items():
            for pid in _processes_of(uid):  # anything of the test's users still running
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["userdel", "--remove", name], capture_output=True)
        if log.is_file():
            shutil.copyfile(log, Path(tempfile.gettempdir()) / "cnn-course-jupyterhub-last.log")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def round_(classroom):
    """The whole round; returns what the tests check."""
    s, clone = classroom["sessions"], classroom["clone"]
    teacher = s[INSTRUCTOR]
    python = sys.executable
    teacher.check([python, "-m", "course", "release"], clone)
    teacher.check([python, "-m", "nbgrader", "release_assignment", ASSIGNMENT], clone)

    source = nbformat.read(str(course.EXERCISE_SOURCE), as_version=4)
    listed, fetched = {}, {}
    for name, kind in STUDENTS.items():
        listed[name] = s[name].assignments()
        s[name].assignments("fetch")
        path = f"api/contents/{ASSIGNMENT}/{ASSIGNMENT}.ipynb"
        nb = nbformat.from_dict(s[name].api("GET", path, params={"content": 1}).json()["content"])
        fetched[name] = nb
        if kind == "correct":
            answered = course.fill_answers(nb, course.instructor_answers(source))
            s[name].api("PUT", path, json={"type": "notebook", "format": "json", "content": answered})
        s[name].assignments("submit")

    collected = teacher.check([python, "-m", "nbgrader", "collect", ASSIGNMENT], clone)
    graded = teacher.check([python, "-m", "course", "grade", "nbgrader/submitted", "--jobs", "2"], clone)
    scores_csv = teacher.api("GET", "api/contents/cnn-course/nbgrader/reports/scores.csv",
                             params={"content": 1, "type": "file", "format": "text"}).json()["content"]
    return {"listed": listed, "fetched": fetched, "collected": collected, "graded": graded,
            "scores": {row["student_id"]: row for row in csv.DictReader(io.StringIO(scores_csv))},
            "exchange": classroom["base"] / "exchange"}


def _autograded_points(nb):
    return sum(float(c.metadata["nbgrader"].get("points", 0)) for c in nb.cells
               if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade"))


def test_students_see_fetch_the_released_student_version(round_):
    for name in STUDENTS:
        released = [a for a in round_["listed"][name]["value"] if a["assignment_id"] == ASSIGNMENT]
        assert released and released[0]["status"] == "released", round_["listed"][name]
        text = json.dumps(round_["fetched"][name])
        assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text
        assert _autograded_points(round_["fetched"][name]) > 0  # the test cells came along


def test_submissions_reach_the_instructor_only_through_the_exchange(round_):
    inbound = round_["exchange"] / COURSE_ID / "inbound"
    assert sorted(p.name.split("+")[0] for p in inbound.iterdir()) == sorted(STUDENTS)
    for name in STUDENTS:
        assert name in round_["collected"]


def test_scores_come_out_as_a_fair_instructor_would_give(round_):
    full = _autograded_points(nbformat.read(str(course.EXERCISE_SOURCE), as_version=4))
    scores = round_["scores"]
    assert set(scores) == set(STUDENTS), round_["graded"]
    for name, kind in STUDENTS.items():
        row = scores[name]
        assert row["status"] == "graded", (name, row, round_["graded"])
        expected = full if kind == "correct" else 0.0
        assert float(row["autograded_total"]) == pytest.approx(expected), (name, row, round_["graded"])


def test_grade_reads_nbgrader_collected_layout(tmp_path):
    nb = nbformat.v4.new_notebook()
    for student in ("ann", "ben"):
        path = tmp_path / "course" / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
        path.parent.mkdir(parents=True)
        nbformat.write(nb, str(path))
    (tmp_path / "course" / "submitted" / "ben" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb").write_text("not json")
    students, unreadable = course.collect(tmp_path / "course" / "submitted", tmp_path / "course")
    assert students == ["ann"] and list(unreadable) == ["ben"]


def test_hub_config_documents_every_setting_it_reads():
    text = HUB_CONFIG.read_text()
    doc, code = text.split('"""')[1], text.split('"""', 2)[2]
    import re

    for variable in set(re.findall(r"CNN_COURSE_\w+", code)):
        assert variable in doc, f"{variable} is read but not documented in the docstring"
