"""A real JupyterHub with a class of system users, for the classroom test and benchmark.

``Classroom`` creates the users (``useradd``), a shared read-only course installation (the
students' copy), an instructor's private clone, and starts JupyterHub with the course's
``instructors/jupyterhub_config.py`` (LocalProcessSpawner, the npm ``configurable-http-proxy``,
the dummy authenticator with a random password) on free loopback ports. Each user logs in
through the hub's REST API (a token requested with the password) and gets a ``UserSession``:
their server's REST API and kernels (``Kernel``: the Jupyter messaging protocol over the
server's websocket, as JupyterLab speaks it). Leaving the ``with`` block stops the hub, ends
every process of the class's users, removes the users and the folders.
"""
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

ROOT = Path(__file__).resolve().parents[1]
HUB_CONFIG = ROOT / "instructors" / "jupyterhub_config.py"
COURSE_ID = "cnn-course"
#: What a shared, read-only course installation holds (the students' copy: no instructors/).
STUDENT_COPY = ("cnn_utils.py", "cnnlib", "course.py", "nbgrader_config.py", "requirements.txt", "README.md",
                "notebooks", "saved_models", "data/README.md")


def readable_by_all(path):
    """True when any user can reach ``path`` (every parent folder searchable by others)."""
    path = Path(path).resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents] if p.is_dir()) \
        and bool(path.stat().st_mode & stat.S_IROTH)


def missing_piece():
    """Why a hub cannot run here (None when it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "creating the class's system users needs root"
    if not (shutil.which("useradd") and shutil.which("userdel")):
        return "useradd/userdel are not installed"
    if not shutil.which("configurable-http-proxy"):
        return ("JupyterHub's proxy is not on PATH: `npm install configurable-http-proxy@5.3.0` "
                "and put its node_modules/.bin on PATH (.ci/run does)")
    try:
        import jupyterhub  # noqa: F401
        import websocket  # noqa: F401
    except ImportError as err:
        return f"{err.name} is not installed (requirements-dev.txt)"
    for path in (sys.prefix, os.path.realpath(sys.executable)):
        if not readable_by_all(path):
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


def processes_of(uid):
    """Process ids owned by ``uid`` (a class user's server and kernels)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except FileNotFoundError:
                pass
    return pids


class Kernel:
    """A kernel of one user's server, driven over its websocket channel."""

    def __init__(self, session, timeout=900):
        import websocket

        self.session = session
        self.id = session.api("POST", "api/kernels", json={"name": "python3"}).json()["id"]
        self.ws = websocket.create_connection(
            f"{session.server.replace('http', 'ws', 1)}/api/kernels/{self.id}/channels",
            header=[f"Authorization: {session.http.headers['Authorization']}"], timeout=timeout)

    def execute(self, code, timeout=900, on_message=None):
        """Run ``code``; returns the request's output messages ``[(msg_type, content)]`` (until idle)."""
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": self.session.name,
                       "session": uuid.uuid4().hex, "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False}}))
        messages, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] in ("dead", "restarting"):
                raise RuntimeError(f"{self.session.name}'s kernel died")
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                if msg["content"]["execution_state"] == "idle":
                    return messages
                continue
            messages.append((msg["msg_type"], msg["content"]))
            if on_message:
                on_message(msg["msg_type"], msg["content"])
        raise TimeoutError(f"{self.session.name}'s kernel did not finish within {timeout} s")

    def close(self):
        try:
            self.ws.close()
        finally:
            self.session.api("DELETE", f"api/kernels/{self.id}")


def stream_text(messages):
    """The printed output (and tracebacks) of ``Kernel.execute``'s messages."""
    return "".join(c["text"] if t == "stream" else "\n".join(c["traceback"]) if t == "error" else ""
                   for t, c in messages)


class UserSession:
    """One hub user: a token requested with the password, their server and its REST API."""

    def __init__(self, hub_url, name, password):
        import requests

        self.http = requests.Session()
        self.hub_url, self.name = hub_url, name
        r = self.http.post(f"{hub_url}/hub/api/users/{name}/tokens",
                           json={"auth": {"username": name, "password": password}, "note": "classroom"})
        if r.status_code not in (200, 201):
            raise RuntimeError(f"token for {name}: {r.status_code} {r.text[:300]}")
        self.http.headers["Authorization"] = f"token {r.json()['token']}"
        self.server = f"{hub_url}/user/{name}"

    def start_server(self):
        r = self.http.post(f"{self.hub_url}/hub/api/users/{self.name}/server")
        if r.status_code not in (201, 202):
            raise RuntimeError(f"starting {self.name}'s server: {r.status_code} {r.text[:300]}")

    def wait_for_server(self, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.http.get(f"{self.hub_url}/hub/api/users/{self.name}").json() \
                    .get("servers", {}).get("", {}).get("ready"):
                return
            time.sleep(1)
        raise TimeoutError(f"{self.name}'s server did not start within {timeout} s")

    def stop_server(self):
        self.http.delete(f"{self.hub_url}/hub/api/users/{self.name}/server", timeout=120)

    def api(self, method, path, **kwargs):
        r = self.http.request(method, f"{self.server}/{path}", timeout=120, **kwargs)
        if not r.ok:
            raise RuntimeError(f"{method} {path} as {self.name}: {r.status_code} {r.text[:500]}")
        return r

    def run(self, argv, cwd, timeout=900):
        """Run a command as this user, in a kernel of their own server; returns (status, output)."""
        kernel = Kernel(self, timeout)
        try:
            messages = kernel.execute(
                "import json, subprocess\n"
                f"r = subprocess.run({list(map(str, argv))!r}, cwd={str(cwd)!r}, capture_output=True, text=True)\n"
                "print(json.dumps([r.returncode, (r.stdout + r.stderr)[-6000:]]))", timeout)
        finally:
            kernel.close()
        text = stream_text(messages).strip()
        try:
            return tuple(json.loads(text.splitlines()[-1]))
        except (IndexError, ValueError):
            raise RuntimeError(f"{argv} as {self.name}: no result from the kernel:\n{text[-2000:]}") from None


class Classroom:
    """``with Classroom(instructors, students) as room:`` a running hub; ``room.sessions[name]``."""

    def __init__(self, instructors=(), students=(), log_copy=None):
        self.instructors, self.students = list(instructors), list(students)
        self.users = self.instructors + self.students
        self.log_copy = log_copy
        self.uids, self.hub, self.sessions = {}, None, {}

    def __enter__(self):
        # Not under /tmp: the grading sandbox mounts a private /tmp over it.
        self.base = Path(tempfile.mkdtemp(prefix="cnn-course-hub-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.log = self.base / "jupyterhub.log"
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self):
        base = self.base
        shared = base / "srv" / "cnn-course"
        _copy_course(shared, with_instructors=False)
        data = Path(os.environ.get("CNN_COURSE_DATA") or ROOT / "data")
        if not ((data / "mnist.npz").is_file() and readable_by_all(data / "mnist.npz")):
            for f in ("mnist.npz", "fashion_mnist.npz"):
                if (data / f).is_file():
                    shutil.copyfile(data / f, shared / "data" / f)
            data = shared / "data"
        subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
        for name in self.users:
            subprocess.run(["userdel", "--remove", name], capture_output=True)  # a leftover of a killed run
            subprocess.run(["useradd", "--create-home", "--home-dir", str(base / "home" / name),
                            "--shell", "/bin/bash", "--user-group", name], check=True, capture_output=True)
            self.uids[name] = pwd.getpwnam(name).pw_uid
        for name in self.instructors:  # each instructor's private clone, with instructors/
            clone = base / "home" / name / "cnn-course"
            _copy_course(clone, with_instructors=True)
            subprocess.run(["chown", "-R", f"{name}:{name}", str(clone)], check=True)
        for name in self.users:
            (base / "home" / name).chmod(0o700)

        password = secrets.token_urlsafe(16)
        port, hub_port, proxy_port = _free_port(), _free_port(), _free_port()
        env = dict(os.environ, CNN_COURSE_HUB_INSTRUCTORS=",".join(self.instructors),
                   CNN_COURSE_HUB_STUDENTS=",".join(self.students), CNN_COURSE_HUB_COURSE_DIR=str(shared),
                   CNN_COURSE_HUB_EXCHANGE=str(base / "exchange"), CNN_COURSE_HUB_COURSE_ID=COURSE_ID,
                   CNN_COURSE_HUB_STATE=str(base / "state"), CNN_COURSE_HUB_URL=f"http://127.0.0.1:{port}",
                   CNN_COURSE_DATA=str(data), CNN_COURSE_OFFLINE="1")
        with self.log.open("w") as out:
            self.hub = subprocess.Popen(
                [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(HUB_CONFIG),
                 "--JupyterHub.authenticator_class=dummy", f"--DummyAuthenticator.password={password}",
                 f"--JupyterHub.hub_bind_url=http://127.0.0.1:{hub_port}",
                 f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{proxy_port}"],
                cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        import requests

        deadline = time.monotonic() + 120
        while True:
            if self.hub.poll() is not None:
                raise RuntimeError(f"JupyterHub exited:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/hub/api/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterHub did not answer:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)
        self.sessions = {name: UserSession(self.url, name, password) for name in self.users}
        for s in self.sessions.values():  # the class logs in at once
            s.start_server()
        for s in self.sessions.values():
            s.wait_for_server()

    def home(self, name):
        return self.base / "home" / name

    def __exit__(self, *exc):
        for s in self.sessions.values():
            try:
                s.stop_server()
            except Exception:  # the hub may be gone already; its processes are ended below
                pass
        if self.hub is not None and self.hub.poll() is None:
            self.hub.send_signal(signal.SIGTERM)  # the hub stops the proxy and the servers it started
            try:
                self.hub.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.hub.pid, signal.SIGKILL)
                self.hub.wait()
        for name, uid in self.uids.items():
            for pid in processes_of(uid):  # anything of the class's users still running
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["userdel", "--remove", name], capture_output=True)
        if self.log_copy and self.log.is_file():
            shutil.copyfile(self.log, self.log_copy)
        shutil.rmtree(self.base, ignore_errors=True)
        return False
