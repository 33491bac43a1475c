"""JupyterHub for a class taking the course, with nbgrader's exchange (README, "Run it on Colab /
JupyterHub / Binder").

    sudo CNN_COURSE_HUB_INSTRUCTORS=teacher CNN_COURSE_HUB_STUDENTS=ada,bob \\
        /srv/cnn-course/.venv/bin/jupyterhub -f instructors/jupyterhub_config.py

What it sets up:

* every user is a system user (the default PAM authenticator checks their passwords) and gets
  their own single-user server (LocalProcessSpawner) started from the course's Python
  environment, the one that runs this hub: no second installation;
* the course's runtime files (``cnn_utils.py``, ``saved_models/``, the notebooks; a student copy
  without ``instructors/``) are installed once, read-only, in ``CNN_COURSE_HUB_COURSE_DIR`` and
  are on every user's ``PYTHONPATH``; the datasets are read from ``CNN_COURSE_DATA``;
* nbgrader's exchange (``CNN_COURSE_HUB_EXCHANGE``) is created, writable by all as nbgrader
  requires, and every user's nbgrader reads the exchange and the course id from one generated
  ``nbgrader_config.py`` (``JUPYTER_CONFIG_PATH``): students fetch and submit from JupyterLab's
  Assignments tab or with ``nbgrader fetch_assignment`` / ``submit``; the instructor releases,
  collects and grades from a private clone of the course (README, for instructors).

Settings (environment variables, read when the hub starts):

    CNN_COURSE_HUB_INSTRUCTORS   comma-separated user names of the instructors
    CNN_COURSE_HUB_STUDENTS      comma-separated user names of the students
    CNN_COURSE_HUB_COURSE_DIR    the shared, read-only course folder      (/srv/cnn-course)
    CNN_COURSE_HUB_EXCHANGE      nbgrader's exchange directory            (/srv/nbgrader/exchange)
    CNN_COURSE_HUB_COURSE_ID     nbgrader's course id                     (cnn-course)
    CNN_COURSE_HUB_STATE         the hub's database, cookie secret and generated nbgrader config
                                                                          (/srv/jupyterhub)
    CNN_COURSE_HUB_AUTHENTICATOR any JupyterHub authenticator name or class (pam); e.g. an
                                 OAuthenticator for the university's single sign-on
    CNN_COURSE_HUB_URL           where the hub listens                    (http://:8000)
    CNN_COURSE_DATA              the folder with mnist.npz and fashion_mnist.npz, readable by all
    CNN_COURSE_OFFLINE           1: the notebooks never try a download (VGG16 falls back at once)
    CNN_COURSE_MEMORY_BUDGET_MB  activations one attribution call may hold, per student (256)
    TORCH_HOME                   torchvision's cache with the VGG16 weights, readable by all
                                                                          (COURSE_DIR/torch)

Anything else can be added below or given on the command line (``--Spawner.mem_limit=3G``).
The course's test (tests/test_classroom_jupyterhub.py) runs this file with the dummy
authenticator and a password on the command line; never use that authenticator for a class.
"""
import os
import sys


def _names(variable):
    return {n.strip() for n in os.environ.get(variable, "").split(",") if n.strip()}


c = get_config()  # noqa: F821 (injected by JupyterHub when it loads this file)

INSTRUCTORS = _names("CNN_COURSE_HUB_INSTRUCTORS")
STUDENTS = _names("CNN_COURSE_HUB_STUDENTS")
COURSE_DIR = os.environ.get("CNN_COURSE_HUB_COURSE_DIR", "/srv/cnn-course")
EXCHANGE = os.environ.get("CNN_COURSE_HUB_EXCHANGE", "/srv/nbgrader/exchange")
COURSE_ID = os.environ.get("CNN_COURSE_HUB_COURSE_ID", "cnn-course")
STATE = os.environ.get("CNN_COURSE_HUB_STATE", "/srv/jupyterhub")
ENV_BIN = os.path.dirname(sys.executable)  # the course's environment: the hub runs in it

# The hub itself: where it listens, its database and cookie secret (kept out of the course folder).
c.JupyterHub.bind_url = os.environ.get("CNN_COURSE_HUB_URL", "http://:8000")
os.makedirs(STATE, mode=0o755, exist_ok=True)
c.JupyterHub.db_url = f"sqlite:///{os.path.join(STATE, 'jupyterhub.sqlite')}"
c.JupyterHub.cookie_secret_file = os.path.join(STATE, "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = os.path.join(STATE, "jupyterhub-proxy.pid")

# Who may log in. The authenticator is configurable: PAM (system passwords) by default.
c.JupyterHub.authenticator_class = os.environ.get("CNN_COURSE_HUB_AUTHENTICATOR", "pam")
c.Authenticator.allowed_users = INSTRUCTORS | STUDENTS

# nbgrader's exchange: created here, writable by everybody (nbgrader's own permission checks
# keep students from reading each other's submissions), and one nbgrader config for all users.
os.makedirs(EXCHANGE, exist_ok=True)
os.chmod(EXCHANGE, 0o777)
NBGRADER_CONFIG_DIR = os.path.join(STATE, "nbgrader")
os.makedirs(NBGRADER_CONFIG_DIR, mode=0o755, exist_ok=True)
with open(os.path.join(NBGRADER_CONFIG_DIR, "nbgrader_config.py"), "w") as f:
    f.write("# Written by the course's jupyterhub_config.py at each start: edit that file instead.\n"
            "c = get_config()\n"
            f"c.CourseDirectory.course_id = {COURSE_ID!r}\n"
            f"c.Exchange.root = {EXCHANGE!r}\n")
os.chmod(os.path.join(NBGRADER_CONFIG_DIR, "nbgrader_config.py"), 0o644)

# Each user's server: a system process of that user, from the course's environment, in their home.
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [os.path.join(ENV_BIN, "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.environment = {
    "PATH": ENV_BIN + os.pathsep + os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
    "PYTHONPATH": COURSE_DIR,                    # import cnn_utils from the shared course folder
    "JUPYTER_CONFIG_PATH": NBGRADER_CONFIG_DIR,  # nbgrader's exchange and course id
    "CNN_COURSE_DATA": os.environ.get("CNN_COURSE_DATA", os.path.join(COURSE_DIR, "data")),
    "CNN_COURSE_OFFLINE": os.environ.get("CNN_COURSE_OFFLINE", ""),
    "TORCH_HOME": os.environ.get("TORCH_HOME", os.path.join(COURSE_DIR, "torch")),  # VGG16 (`make prefetch`)
    # A class shares one server: each attribution call holds at most 256 MiB of activations
    # (1024 on a laptop), the difference between 20 students at once fitting 24 GB or not.
    "CNN_COURSE_MEMORY_BUDGET_MB": os.environ.get("CNN_COURSE_MEMORY_BUDGET_MB", "256"),
}
# Kernels idle for 30 minutes are shut down (their memory returned); the notebook stays open.
c.Spawner.args = ["--MappingKernelManager.cull_idle_timeout=1800",
                  "--MappingKernelManager.cull_interval=300"]
# A loaded machine (a class logging in at once) starts servers slowly.
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
