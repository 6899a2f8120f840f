"""Processes: fork() while another thread is inside a step (the child must not hang, and
runs its steps on more than one thread: 9 of 10 children hung on the work pool's lock,
copied while held, the others ran on one thread), and interpreter exit while a daemon
thread is inside a step (the process aborted: exit code 134)."""

import subprocess
import sys

import pytest

from conftest import torch_or_skip

SCRIPT = r"""
import os, threading, time
import numpy as np, fastadam
fastadam.set_num_threads(2)
n = 2_000_000
p = np.zeros(n, np.float32); g = np.ones(n, np.float32)
opt = fastadam.Adam([p], lr=1e-3)
stop = False
def stepper():
    while not stop:
        opt.step([g])
t = threading.Thread(target=stepper); t.start()
hung, threads = 0, []
for k in range(12):
    time.sleep(0.003)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        q = np.zeros(n, np.float32)
        fastadam.Adam([q], lr=1e-3).step([np.ones(n, np.float32)])
        ok = bool(np.all(q == np.float32(-1e-3)))
        os.write(w, f"{len(os.listdir('/proc/self/task'))}:{ok}".encode())
        os._exit(0)
    os.close(w)
    deadline = time.time() + 20
    while time.time() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            break
        time.sleep(0.01)
    else:
        hung += 1
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    threads.append(os.read(r, 100).decode())
    os.close(r)
stop = True
t.join()
print(hung, ",".join(threads))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc/self/task: Linux")
def test_fork_during_another_threads_step():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    hung, children = out.stdout.split()
    assert hung == "0", f"{hung} of 12 children hung (each child's report: {children})"
    for report in children.split(","):
        threads, correct = report.split(":")
        assert correct == "True", "a child's step gave wrong values"
        assert int(threads) >= 2, f"a child stepped on one thread only ({report})"


DAEMON = r"""
import sys, threading, time
import numpy as np, fastadam
n = 4_000_000
if sys.argv[1] == "torch":
    import torch, fastadam.torch as ft
    p = torch.nn.Parameter(torch.zeros(n)); p.grad = torch.ones(n)
    opt = ft.Adam([p], lr=1e-3)
    step = opt.step
else:
    p, g = np.zeros(n, np.float32), np.ones(n, np.float32)
    opt = fastadam.Adam([p], lr=1e-3)
    step = lambda: opt.step([g])
def loop():
    while True:
        step()
threading.Thread(target=loop, daemon=True).start()
time.sleep(0.05)
print("exiting", flush=True)
"""


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_interpreter_exit_while_a_daemon_thread_steps(kind):
    if kind == "torch":
        torch_or_skip()
    for _ in range(3):  # the thread is inside a step at exit nearly every time
        out = subprocess.run([sys.executable, "-c", DAEMON, kind], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout == "exiting\n", (out.returncode, out.stdout, out.stderr[-2000:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task and the affinity mask: Linux")
def test_more_threads_than_cpus_starts_no_more_workers_than_cpus():
    # set_num_threads(64) on 2 CPUs started 63 spinning workers: steps 20 times slower.
    code = (
        "import os, numpy as np, fastadam\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "fastadam.set_num_threads(64)\n"
        "p = np.zeros(2_000_000, np.float32); o = fastadam.Adam([p], lr=1e-3)\n"
        "for _ in range(20): o.step([np.ones_like(p)])\n"
        "print(len(os.listdir('/proc/self/task')) - before, len(os.sched_getaffinity(0)), fastadam.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    started, cpus, threads = map(int, out.stdout.split())
    assert threads == 64  # what was asked for stays what get_num_threads() says
    assert started <= cpus - 1, f"{started} workers started for {cpus} CPUs"
