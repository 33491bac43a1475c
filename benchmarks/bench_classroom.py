"""How big a server does a class need? N students run notebook 04 at once on the course's JupyterHub.

Starts the course's hub (``instructors/jupyterhub_config.py``; ``tests/classroom_hub.py`` creates
the system users, the shared course installation and the hub, as the classroom test does) with N
students (default 20). Each logs in through the hub's REST API and starts their own server, all at
once; then each starts a kernel in their server and runs notebook 04 cell by cell over the kernel's
websocket, as JupyterLab does (``FAST = True`` after the parameters cell, as the tests run it).

Measured per student: time from the kernel's start (opening the notebook) to the first figure and
to the end, cells done within ``--budget`` seconds, and peak memory of all the user's processes
(server and kernel; PSS, shared libraries split between users, and RSS). Reference in the same
run: one student alone, before the class. Also printed: the servers' start time, the machine's
load average and the memory used by other jobs, and the memory 50 students need. A guard ends the
class's kernels when the machine runs short of memory (``--min-available-gb``; a student needs
about 1.2 GB with the hub's 256 MiB attribution budget).

    sudo CNN_COURSE_DATA=/path/to/datasets PATH=/path/to/configurable-http-proxy/bin:$PATH \\
        .venv/bin/python benchmarks/bench_classroom.py [--students 20] [--budget 360]
"""
import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from classroom_hub import Classroom, Kernel, missing_piece, processes_of, stream_text  # noqa: E402

NOTEBOOK = ROOT / "notebooks" / "04_saliency_and_cam.ipynb"


def notebook_cells():
    """The code cells of notebook 04, with ``FAST = True`` after the parameters cell."""
    cells = []
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] == "code":
            cells.append("".join(cell["source"]))
            if "parameters" in cell["metadata"].get("tags", []):
                cells.append("FAST = True")
    return cells


def cpu_seconds_of(uid):
    """CPU time (user + system) used so far by the running processes of ``uid``."""
    ticks = 0
    for pid in processes_of(uid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_of(uid):
    """(PSS, RSS) in MB of every process of ``uid``."""
    pss = rss = 0
    for pid in processes_of(uid):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return pss / 1024, rss / 1024


class Sampler(threading.Thread):
    """Every second: each user's memory (peak kept), the load average, the machine's used memory.
    The guard: below ``min_available_mb`` of available memory it ends the class's kernels, so that
    the measurement never pushes the machine (shared with other work) out of memory."""

    def __init__(self, uids, min_available_mb):
        super().__init__(daemon=True)
        self.uids, self.peak = uids, {name: (0.0, 0.0) for name in uids}
        self.cpu_start = {name: cpu_seconds_of(uid) for name, uid in uids.items()}
        self.cpu = {name: 0.0 for name in uids}  # CPU seconds used since the start (peak over samples)
        self.load, self.stop = [], threading.Event()
        self.used_before = meminfo_mb()[0]
        self.used_peak, self.min_available_mb, self.guard_tripped = self.used_before, min_available_mb, False

    def run(self):
        while not self.stop.is_set():
            for name, uid in self.uids.items():
                pss, rss = memory_of(uid)
                self.peak[name] = (max(self.peak[name][0], pss), max(self.peak[name][1], rss))
                self.cpu[name] = max(self.cpu[name], cpu_seconds_of(uid) - self.cpu_start[name])
            self.load.append(os.getloadavg()[0])
            used, available = meminfo_mb()
            self.used_peak = max(self.used_peak, used)
            if available < self.min_available_mb:
                self.guard_tripped = True
                for uid in self.uids.values():
                    for pid in processes_of(uid):
                        try:
                            if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                                os.kill(pid, signal.SIGKILL)
                        except (FileNotFoundError, ProcessLookupError):
                            pass
            self.stop.wait(1.0)


def meminfo_mb():
    """(used, available) memory of the machine in MB."""
    info = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return (info["MemTotal"] - info["MemAvailable"]) / 1024, info["MemAvailable"] / 1024


def run_student(session, cells, deadline, results, stopped):
    """Run notebook 04 in a kernel of ``session``'s server until done, ``deadline`` or ``stopped()``."""
    result = {"first_figure": None, "cells": 0, "error": None, "finished": False}
    results[session.name] = result
    kernel, start = None, time.monotonic()

    def on_message(msg_type, content):
        if result["first_figure"] is None and msg_type in ("display_data", "execute_result") \
                and "image/png" in content.get("data", {}):
            result["first_figure"] = time.monotonic() - start

    try:
        kernel = Kernel(session, timeout=max(10, deadline - time.monotonic()))
        for code in cells:
            left = deadline - time.monotonic()
            if left <= 0 or stopped():
                break
            messages = kernel.execute(code, timeout=left, on_message=on_message)
            if any(t == "error" for t, _ in messages):
                result["error"] = stream_text(messages)[-600:]
                break
            result["cells"] += 1
        else:
            result["finished"] = True
            result["seconds"] = time.monotonic() - start
    except TimeoutError:
        pass
    except Exception as err:  # the websocket closed, the server died: report it, go on with the others
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        try:
            if kernel is not None:
                kernel.close()
        except Exception:  # the kernel or the server is gone already
            pass


def run_class(room, names, cells, budget, min_available_mb):
    sampler = Sampler({n: room.uids[n] for n in names}, min_available_mb)
    sampler.start()
    results, deadline = {}, time.monotonic() + budget
    threads = [threading.Thread(target=run_student, args=(room.sessions[n], cells, deadline, results,
                                                          lambda: sampler.guard_tripped))
               for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sampler.stop.set()
    sampler.join()
    return results, sampler


def median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def summary(label, results, sampler, cells):
    firsts = [r["first_figure"] for r in results.values()]
    pss = [p for p, _ in sampler.peak.values()]
    rss = [r for _, r in sampler.peak.values()]
    done = sum(r["finished"] for r in results.values())
    errors = [f"{n}: {r['error']}" for n, r in results.items() if r["error"]]
    got = [f for f in firsts if f is not None]
    print(f"\n{label}: {len(results)} student(s)")
    print(f"  time to first figure: median {median(firsts) or float('nan'):.1f} s, slowest "
          f"{max(got) if got else float('nan'):.1f} s ({len(got)}/{len(results)} saw one)")
    print(f"  notebook finished within the budget: {done}/{len(results)} (median "
          f"{median([r.get('seconds') for r in results.values()]) or float('nan'):.0f} s); cells done: median "
          f"{median([r['cells'] for r in results.values()])}/{len(cells)}")
    if sampler.guard_tripped:
        print(f"  STOPPED by the memory guard: the machine had under {sampler.min_available_mb / 1024:.1f} GB "
              "available; the class's kernels were ended")
    print(f"  peak memory per user (server + kernel): PSS median {median(pss):.0f} MB, max {max(pss):.0f} MB; "
          f"RSS median {median(rss):.0f} MB")
    print(f"  CPU time per student (server + kernel): median {median(list(sampler.cpu.values())):.0f} s")
    print(f"  machine: load average (1 min) median {median(sampler.load) or 0:.1f}, max "
          f"{max(sampler.load or [0]):.1f}; memory used {sampler.used_before / 1024:.1f} GB before, "
          f"{sampler.used_peak / 1024:.1f} GB at the peak")
    for e in errors[:3]:
        print("  error:", e.replace("\n", " ")[:300])
    return {"first_figure": median(firsts), "pss": median(pss), "pss_max": max(pss), "done": done,
            "cpu": median(list(sampler.cpu.values()))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=20, help="students logged in, each with their server")
    parser.add_argument("--running", type=int, default=None,
                        help="how many of them run notebook 04 at once (default: all)")
    parser.add_argument("--budget", type=float, default=360, help="seconds the class may run notebook 04")
    parser.add_argument("--reference-budget", type=float, default=150, help="seconds for the student alone")
    parser.add_argument("--min-available-gb", type=float, default=2.5,
                        help="end the kernels when the machine has less memory available (default 2.5)")
    args = parser.parse_args()
    reason = missing_piece()
    if reason:
        sys.exit(f"cannot start a hub here: {reason}")
    names = [f"cnnload-{i:02d}" for i in range(args.students + 1)]
    cells = notebook_cells()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before the hub starts")
    t0 = time.monotonic()
    with Classroom([], names) as room:
        start_seconds = time.monotonic() - t0
        idle = [memory_of(uid)[0] for uid in room.uids.values()]
        print(f"hub up and {len(names)} servers started at once in {start_seconds:.0f} s; "
              f"a logged-in user's idle server: PSS median {median(idle):.0f} MB; "
              f"memory used {meminfo_mb()[0] / 1024:.1f} GB, load average {os.getloadavg()[0]:.1f}")
        guard = args.min_available_gb * 1024
        alone, sampler = run_class(room, names[:1], cells, args.reference_budget, guard)
        ref = summary("Reference, one student alone", alone, sampler, cells)
        running = names[1:1 + (args.running or args.students)]
        together, sampler = run_class(room, running, cells, args.budget, guard)
        res = summary(f"The class: {len(running)} of {args.students} logged-in students run it at once",
                      together, sampler, cells)
    if ref["first_figure"] and res["first_figure"]:
        print(f"\ntime to first figure, class / alone: {res['first_figure'] / ref['first_figure']:.1f}")
    per_user_gb = res["pss_max"] / 1024
    print(f"sizing for 50 students all running notebook 04: memory {50 * per_user_gb:.0f} GB "
          f"(50 x {per_user_gb:.2f} GB peak per user) plus the system")
    if ref["done"]:
        for minutes in (2, 5):
            print(f"  cores to run it for all 50 within {minutes} min: 50 x {ref['cpu']:.0f} CPU s "
                  f"/ {60 * minutes} s = {50 * ref['cpu'] / (60 * minutes):.0f}")


if __name__ == "__main__":
    main()
