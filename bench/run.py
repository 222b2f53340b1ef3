#!/usr/bin/env python3
"""ferry benchmark harness: ferry vs haproxy, nginx (stream), socat and a direct path.

One command, Python standard library only:

    python3 bench/run.py [--quick] [--rounds N] [--only bulk,redis,connrate,memory]
                         [--contenders direct,ferry,...] [--out bench/results/NAME.json]

Everything runs on loopback; every subprocess has a timeout and every server
this script starts is killed (by process group) before it exits.
See bench/README.md for what each measurement means.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import random
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
TOOLS_MANIFEST = os.path.join(BENCH_DIR, "tools", "Cargo.toml")
TOOLS_BIN = os.path.join(BENCH_DIR, "tools", "target", "release")
FERRY_BIN = os.path.join(ROOT, "target", "release", "ferry")

ALL_CONTENDERS = ["direct", "ferry", "haproxy", "haproxy-splice", "nginx", "socat"]
ALL_MEASUREMENTS = ["bulk", "redis", "connrate", "memory"]
LOOP = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

PROFILES = {
    # Each contender-round costs roughly: bulk 2*T+3 s, redis ~5 s, connrate D+1 s,
    # memory ~8 s. 6 contenders x 3 rounds of the full profile is ~10-12 minutes.
    "full": dict(rounds=3, bulk_secs=5, redis_requests=100_000, redis_clients=50,
                 connrate_secs=5, connrate_workers=64, mem_conns=9_700, socat_mem_conns=1_000),
    "quick": dict(rounds=1, bulk_secs=2, redis_requests=20_000, redis_clients=50,
                  connrate_secs=2, connrate_workers=64, mem_conns=1_000, socat_mem_conns=500),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Process management: every child gets its own process group; all are killed on exit.
# --------------------------------------------------------------------------------------

LIVE: list[subprocess.Popen] = []


def _child_setup() -> None:
    """preexec_fn: raise the open-file soft limit to the hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def spawn(cmd: list[str], log_path: str | None = None, stdin=subprocess.DEVNULL,
          stdout=None, cwd: str | None = None) -> subprocess.Popen:
    out = stdout
    err = subprocess.DEVNULL
    logf = None
    if log_path is not None:
        logf = open(log_path, "ab")
        err = logf
        if out is None:
            out = logf
    if out is None:
        out = subprocess.DEVNULL
    try:
        p = subprocess.Popen(cmd, stdin=stdin, stdout=out, stderr=err, cwd=cwd,
                             start_new_session=True, preexec_fn=_child_setup)
    finally:
        if logf is not None:
            logf.close()
    LIVE.append(p)
    return p


def kill(p: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left of it."""
    if p is None:
        return
    try:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while group members (nginx workers, socat
        # children) linger: always sweep the group.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # Wait (bounded) until the whole group is gone, reaping orphans re-parented to us.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            reap_orphans()
            if not group_pids(p.pid, include_zombies=True):
                break
            time.sleep(0.05)
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
    finally:
        if p in LIVE:
            LIVE.remove(p)


def become_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: processes orphaned by a dying proxy (socat's forks, nginx
    workers) are re-parented to us, so we reap them instead of leaving zombies to an
    init that may not reap (containers)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER = 36
    except (OSError, AttributeError):
        pass


def reap_orphans() -> None:
    """waitpid() our zombie children that no Popen object owns."""
    me, owned = str(os.getpid()), {p.pid for p in LIVE}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in owned:
            f = _stat_fields(int(name))
            if f and f[0] == "Z" and f[1] == me:
                try:
                    os.waitpid(int(name), os.WNOHANG)
                except ChildProcessError:
                    pass


def kill_all() -> None:
    for p in list(LIVE):
        kill(p, grace=2.0)


def _on_signal(signum, _frame):
    raise SystemExit(f"interrupted by signal {signum}")


def run_capture(cmd: list[str], timeout: float, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Like subprocess.run(capture_output=True) with a timeout that kills the whole group."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=cwd, start_new_session=True,
                         preexec_fn=_child_setup)
    LIVE.append(p)
    try:
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, p.returncode, out.decode(errors="replace"),
                                           err.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        kill(p)
        raise
    finally:
        if p in LIVE:
            LIVE.remove(p)


# --------------------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm may contain spaces/parens: split after the last ')'.
    rest = data[data.rfind(")") + 2:].split()
    return rest  # rest[0]=state, [1]=ppid, [2]=pgrp, [11]=utime, [12]=stime, [13]=cutime, [14]=cstime


def group_pids(pgid: int, include_zombies: bool = False) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f and len(f) > 2 and f[2] == str(pgid) and (include_zombies or f[0] != "Z"):
            pids.append(int(name))
    return pids


def cpu_times(pgid: int) -> tuple[float, float]:
    """(user, system) CPU seconds (+ reaped children's) summed over the process group.
    System time is the kernel's work done on the proxy's behalf: its system calls, and
    the loopback TCP processing that runs in their context."""
    user = system = 0
    for pid in group_pids(pgid):
        f = _stat_fields(pid)
        if f and len(f) > 14:
            user += int(f[11]) + int(f[13])
            system += int(f[12]) + int(f[14])
    return user / CLK_TCK, system / CLK_TCK


def memory_kib(pgid: int) -> dict:
    """Sum of Rss and Pss (KiB) over the process group (smaps_rollup; VmRSS fallback)."""
    rss = pss = 0
    pids = group_pids(pgid)
    for pid in pids:
        got = False
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                        got = True
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
        if not got:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            v = int(line.split()[1])
                            rss += v
                            pss += v
            except OSError:
                pass
    return {"rss_kib": rss, "pss_kib": pss, "procs": len(pids)}


# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------

_USED_PORTS: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port, preferably below the ephemeral range (the load generators
    churn through ephemeral ports), never handed out twice in one run."""
    low = _ephemeral_low()
    candidates = []
    if low > 12000:
        candidates = random.sample(range(10000, low), 200)
    for port in candidates + [0] * 20:
        if port in _USED_PORTS:
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((LOOP, port))
            got = s.getsockname()[1]
        except OSError:
            continue
        finally:
            s.close()
        if got not in _USED_PORTS:
            _USED_PORTS.add(got)
            return got
    raise RuntimeError("no free loopback port found")


def is_listening(port: int) -> bool:
    """True when something listens on 127.0.0.1:port. Probes by binding with SO_REUSEADDR
    (which only conflicts with a *listening* socket), so no connection is ever made:
    a probe connection would reach the backend through the proxy."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((LOOP, port))
        return False
    except OSError:
        return True
    finally:
        s.close()


def wait_listening(port: int, proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        if is_listening(port):
            time.sleep(0.1)  # let multi-process servers (nginx workers) finish starting
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {LOOP}:{port} after {timeout:.0f}s")


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------

class Contender:
    name = "?"
    has_process = True

    def __init__(self, tmp: str, fd_hard: int):
        self.tmp = tmp
        self.fd_hard = fd_hard

    def available(self) -> str | None:
        """None when usable, else the reason it is skipped."""
        return None

    def version(self) -> str:
        return ""

    def start(self, listen: int, backend: int, tag: str) -> subprocess.Popen | None:
        raise NotImplementedError

    def log_path(self, tag: str) -> str:
        return os.path.join(self.tmp, f"{self.name}-{tag}.log")


class Direct(Contender):
    name = "direct"
    has_process = False

    def start(self, listen, backend, tag):
        return None


class Ferry(Contender):
    name = "ferry"

    def __init__(self, tmp, fd_hard, build_error: str | None, mode: str):
        super().__init__(tmp, fd_hard)
        self.build_error = build_error
        self.mode = mode

    def available(self):
        if self.build_error:
            return self.build_error
        if not os.access(FERRY_BIN, os.X_OK):
            return f"{FERRY_BIN} not found (ferry not built yet?)"
        return None

    def version(self):
        v = ""
        try:
            r = run_capture([FERRY_BIN, "--version"], timeout=10)
            v = (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr).strip() else ""
        except (subprocess.TimeoutExpired, OSError, IndexError):
            pass
        try:
            rev = run_capture(["git", "-C", ROOT, "describe", "--always", "--dirty"], timeout=10).stdout.strip()
        except (subprocess.TimeoutExpired, OSError):
            rev = ""
        try:
            built = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(FERRY_BIN)))
        except OSError:
            built = "?"
        return f"{v} (tree git {rev}, binary built {built})".strip() if rev else f"{v} (binary built {built})"

    def start(self, listen, backend, tag):
        if self.mode == "quick":
            cmd = [FERRY_BIN, "run", "--listen", f"{LOOP}:{listen}", "--upstream", f"{LOOP}:{backend}"]
        else:
            cfg = os.path.join(self.tmp, f"ferry-{tag}.toml")
            with open(cfg, "w") as f:
                f.write(f"""[global]
workers = 2

[log]
access = "off"
level = "warn"

[[listener]]
name = "bench"
listen = ["{LOOP}:{listen}"]
upstream = "backend"

[[upstream]]
name = "backend"
servers = ["{LOOP}:{backend}"]
""")
            cmd = [FERRY_BIN, "run", "--config", cfg]
        return spawn(cmd, log_path=self.log_path(tag))


class HAProxy(Contender):
    def __init__(self, tmp, fd_hard, splice: bool):
        super().__init__(tmp, fd_hard)
        self.splice = splice
        self.name = "haproxy-splice" if splice else "haproxy"

    def available(self):
        return None if shutil.which("haproxy") else "haproxy not installed (bench/setup.sh)"

    def version(self):
        try:
            return run_capture(["haproxy", "-v"], timeout=10).stdout.splitlines()[0].strip()
        except (subprocess.TimeoutExpired, OSError, IndexError):
            return ""

    def maxconn(self) -> tuple[int, int]:
        # haproxy needs ~2 fds per connection plus 2 per pipe (splice) plus a few.
        maxpipes = 128 if self.splice else 0
        return max(100, (self.fd_hard - 2 * maxpipes - 200) // 2), maxpipes

    def start(self, listen, backend, tag):
        maxconn, maxpipes = self.maxconn()
        splice = "    option splice-request\n    option splice-response\n" if self.splice else ""
        pipes = f"    maxpipes {maxpipes}\n" if maxpipes else ""
        cfg = os.path.join(self.tmp, f"{self.name}-{tag}.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
    nbthread 2
    maxconn {maxconn}
{pipes}
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 10m
    timeout server 10m
{splice}
frontend bench
    bind {LOOP}:{listen}
    default_backend backend

backend backend
    server s1 {LOOP}:{backend}
""")
        return spawn(["haproxy", "-db", "-f", cfg], log_path=self.log_path(tag))


class Nginx(Contender):
    name = "nginx"

    def __init__(self, tmp, fd_hard):
        super().__init__(tmp, fd_hard)
        self.module = None

    def _stream_module(self) -> tuple[bool, str | None]:
        """(needs_load_module, path)."""
        try:
            v = run_capture(["nginx", "-V"], timeout=10)
            text = v.stdout + v.stderr
        except (subprocess.TimeoutExpired, OSError):
            text = ""
        if "--with-stream " in text + " " and "--with-stream=dynamic" not in text:
            return False, None
        for cand in ["/usr/lib/nginx/modules/ngx_stream_module.so",
                     "/usr/share/nginx/modules/ngx_stream_module.so"]:
            if os.path.exists(cand):
                return True, cand
        try:
            r = run_capture(["dpkg", "-L", "libnginx-mod-stream"], timeout=10)
            for line in r.stdout.splitlines():
                if line.endswith("ngx_stream_module.so") and os.path.exists(line):
                    return True, line
        except (subprocess.TimeoutExpired, OSError):
            pass
        return True, None

    def available(self):
        if not shutil.which("nginx"):
            return "nginx not installed (bench/setup.sh)"
        need, path = self._stream_module()
        if need and path is None:
            return "nginx stream module not found (apt-get install libnginx-mod-stream)"
        self.module = path
        return None

    def version(self):
        try:
            r = run_capture(["nginx", "-v"], timeout=10)
            return (r.stderr + r.stdout).strip().splitlines()[0]
        except (subprocess.TimeoutExpired, OSError, IndexError):
            return ""

    def start(self, listen, backend, tag):
        prefix = os.path.join(self.tmp, f"nginx-{tag}")
        os.makedirs(prefix, exist_ok=True)
        load = f"load_module {self.module};\n" if self.module else ""
        user = "user root;\n" if os.geteuid() == 0 else ""
        conns = max(1024, self.fd_hard - 500)
        cfg = os.path.join(prefix, "nginx.conf")
        with open(cfg, "w") as f:
            f.write(f"""{load}{user}worker_processes 2;
worker_rlimit_nofile {self.fd_hard};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections {conns};
}}

stream {{
    upstream backend {{
        server {LOOP}:{backend};
    }}
    server {{
        listen {LOOP}:{listen};
        proxy_pass backend;
        proxy_connect_timeout 5s;
        proxy_timeout 10m;
    }}
}}
""")
        return spawn(["nginx", "-p", prefix, "-c", cfg, "-e", f"{prefix}/error.log",
                      "-g", "daemon off;"], log_path=self.log_path(tag))

    def log_path(self, tag):
        return os.path.join(self.tmp, f"nginx-{tag}.log")


class Socat(Contender):
    name = "socat"

    def available(self):
        return None if shutil.which("socat") else "socat not installed (bench/setup.sh)"

    def version(self):
        try:
            for line in run_capture(["socat", "-V"], timeout=10).stdout.splitlines():
                if line.startswith("socat version"):
                    return line.strip()
        except (subprocess.TimeoutExpired, OSError):
            pass
        return ""

    def start(self, listen, backend, tag):
        return spawn(["socat", f"TCP-LISTEN:{listen},bind={LOOP},fork,reuseaddr,backlog=4096,nodelay",
                      f"TCP:{LOOP}:{backend},nodelay"], log_path=self.log_path(tag))


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------

class Backend:
    """A backend server started once per measurement and shared by all contenders."""

    def __init__(self, name: str, cmd_fn: Callable[[int], list[str]], tmp: str):
        self.name = name
        self.port = free_port()
        self.log = os.path.join(tmp, f"backend-{name}-{self.port}.log")
        self.proc = spawn(cmd_fn(self.port), log_path=self.log)
        try:
            wait_listening(self.port, self.proc)
        except RuntimeError as e:
            kill(self.proc)
            raise RuntimeError(f"backend {name}: {e}\n{tail(self.log)}") from None

    def stop(self):
        kill(self.proc)


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, prof: dict, tmp: str, contenders: list[Contender]):
        self.args = args
        self.prof = prof
        self.tmp = tmp
        self.contenders = contenders
        self.fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.raw: dict[str, dict[str, list[dict]]] = {}
        self.errors: list[str] = []

    def tool(self, name: str) -> str:
        return os.path.join(TOOLS_BIN, name)

    # -- one contender turn ---------------------------------------------------------

    def with_proxy(self, c: Contender, backend_port: int, tag: str, body: Callable[[int, int | None], dict]) -> dict | None:
        """Start contender `c` in front of `backend_port`, run body(port, pgid), stop it."""
        proc = None
        try:
            if c.has_process:
                port = free_port()
                proc = c.start(port, backend_port, tag)
                try:
                    wait_listening(port, proc)
                except RuntimeError as e:
                    raise RuntimeError(f"{e}\n{tail(c.log_path(tag))}") from None
                pgid = proc.pid
            else:
                port, pgid = backend_port, None
            result = body(port, pgid)
            if proc is not None and proc.poll() is not None:
                result["warning"] = f"proxy exited (code {proc.returncode}) during the test"
                self.errors.append(f"{tag} {c.name}: {result['warning']}\n{tail(c.log_path(tag))}")
            return result
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError, OSError) as e:
            msg = f"{tag} {c.name}: {type(e).__name__}: {e}".strip()
            log("ERROR " + msg)
            self.errors.append(msg)
            return None
        finally:
            kill(proc)

    def interleaved(self, measurement: str, contenders: list[Contender], fn: Callable[[Contender, int], dict | None]) -> None:
        per = self.raw.setdefault(measurement, {})
        for r in range(self.prof["rounds"]):
            order = contenders if r % 2 == 0 else list(reversed(contenders))
            for c in order:
                log(f"{measurement}: round {r + 1}/{self.prof['rounds']} {c.name}")
                try:
                    res = fn(c, r)
                except Exception as e:  # noqa: BLE001 - one failed turn must not end the run
                    msg = f"{measurement}-r{r + 1} {c.name}: {type(e).__name__}: {e}"
                    log("ERROR " + msg)
                    self.errors.append(msg)
                    res = None
                if res is not None:
                    res["round"] = r + 1
                    per.setdefault(c.name, []).append(res)

    # -- bulk ------------------------------------------------------------------------

    def bulk(self) -> None:
        secs = self.prof["bulk_secs"]

        def one(c: Contender, r: int):
            # A fresh iperf3 server per turn: a wedged server can't spoil later turns.
            srv = Backend("iperf3", lambda p: ["iperf3", "-s", "-B", LOOP, "-p", str(p)], self.tmp)
            try:
                def body(port, pgid):
                    out = {}
                    for streams in (1, 8):
                        cpu0 = cpu_times(pgid) if pgid else None
                        res = run_capture(["iperf3", "-c", LOOP, "-p", str(port), "-t", str(secs),
                                           "-P", str(streams), "-J", "--connect-timeout", "5000"],
                                          timeout=secs + 30)
                        cpu1 = cpu_times(pgid) if pgid else None
                        try:
                            j = json.loads(res.stdout)
                        except json.JSONDecodeError:
                            raise RuntimeError(f"iperf3 -P {streams}: no JSON (rc {res.returncode}): "
                                               f"{res.stderr.strip()[:300]}") from None
                        if "error" in j:
                            raise RuntimeError(f"iperf3 -P {streams}: {j['error']}")
                        recv = j["end"]["sum_received"]
                        gb = recv["bytes"] / 1e9
                        out[f"p{streams}_gbps"] = recv["bits_per_second"] / 1e9
                        out[f"p{streams}_bytes"] = recv["bytes"]
                        if pgid and gb > 0:
                            cpu = sum(cpu1) - sum(cpu0)
                            out[f"p{streams}_cpu_s"] = cpu
                            out[f"p{streams}_cpu_s_per_gb"] = cpu / gb
                            out[f"p{streams}_sys_s_per_gb"] = (cpu1[1] - cpu0[1]) / gb
                        time.sleep(0.3)
                    return out
                return self.with_proxy(c, srv.port, f"bulk-r{r + 1}", body)
            finally:
                srv.stop()

        self.interleaved("bulk", self.contenders, one)

    # -- redis -----------------------------------------------------------------------

    def redis(self) -> None:
        n = self.prof["redis_requests"]
        clients = self.prof["redis_clients"]
        rdir = os.path.join(self.tmp, "redis")
        os.makedirs(rdir, exist_ok=True)
        srv = Backend("redis", lambda p: ["redis-server", "--port", str(p), "--bind", LOOP,
                                          "--save", "", "--appendonly", "no", "--protected-mode", "no",
                                          "--daemonize", "no", "--dir", rdir], self.tmp)
        try:
            def one(c: Contender, r: int):
                def body(port, pgid):
                    cpu0 = cpu_times(pgid) if pgid else None
                    res = run_capture(["redis-benchmark", "-h", LOOP, "-p", str(port), "-c", str(clients),
                                       "-n", str(n), "-t", "ping,set,get", "--csv"], timeout=600)
                    cpu1 = cpu_times(pgid) if pgid else None
                    tests = parse_redis_csv(res.stdout)
                    if not tests:
                        raise RuntimeError(f"redis-benchmark: no CSV rows (rc {res.returncode}): "
                                           f"{(res.stderr or res.stdout).strip()[:300]}")
                    out = {"tests": tests}
                    if pgid:
                        total = n * len(tests)
                        out["cpu_s"] = sum(cpu1) - sum(cpu0)
                        out["cpu_us_per_req"] = out["cpu_s"] * 1e6 / total
                        out["sys_us_per_req"] = (cpu1[1] - cpu0[1]) * 1e6 / total
                    return out
                return self.with_proxy(c, srv.port, f"redis-r{r + 1}", body)

            self.interleaved("redis", self.contenders, one)
        finally:
            srv.stop()

    # -- connrate --------------------------------------------------------------------

    def connrate(self) -> None:
        secs = self.prof["connrate_secs"]
        workers = self.prof["connrate_workers"]
        srv = Backend("echo", lambda p: [self.tool("echo"), "--listen", f"{LOOP}:{p}"], self.tmp)
        try:
            def one(c: Contender, r: int):
                def body(port, pgid):
                    cpu0 = cpu_times(pgid) if pgid else None
                    res = run_capture([self.tool("connrate"), "--target", f"{LOOP}:{port}",
                                       "--duration", str(secs), "--workers", str(workers)],
                                      timeout=secs + 60)
                    cpu1 = cpu_times(pgid) if pgid else None
                    try:
                        j = json.loads(res.stdout.strip().splitlines()[-1])
                    except (json.JSONDecodeError, IndexError):
                        raise RuntimeError(f"connrate: no JSON (rc {res.returncode}): {res.stderr.strip()[:300]}") from None
                    out = {"rate_per_s": j["rate_per_s"], "completed": j["completed"], "errors": j["errors"],
                           "p50_ms": j["latency_us"]["p50"] / 1000, "p99_ms": j["latency_us"]["p99"] / 1000,
                           "first_error": j.get("first_error")}
                    if pgid and j["completed"]:
                        out["cpu_s"] = sum(cpu1) - sum(cpu0)
                        out["cpu_us_per_conn"] = out["cpu_s"] * 1e6 / j["completed"]
                        out["sys_us_per_conn"] = (cpu1[1] - cpu0[1]) * 1e6 / j["completed"]
                    return out
                return self.with_proxy(c, srv.port, f"connrate-r{r + 1}", body)

            self.interleaved("connrate", self.contenders, one)
        finally:
            srv.stop()

    # -- memory ----------------------------------------------------------------------

    def memory(self) -> None:
        # Each relayed connection costs the proxy 2 fds; keep headroom for listeners/logs.
        cap = max(10, (self.fd_hard - 300) // 2)
        srv = Backend("echo", lambda p: [self.tool("echo"), "--listen", f"{LOOP}:{p}"], self.tmp)
        try:
            def one(c: Contender, r: int):
                n = min(self.prof["mem_conns"], cap)
                if c.name == "socat":
                    n = min(n, self.prof["socat_mem_conns"])  # one forked process per connection
                if isinstance(c, HAProxy):
                    n = min(n, c.maxconn()[0] - 10)

                def body(port, pgid):
                    # Warm up: one relayed round trip, so lazy one-time allocations are in the baseline.
                    with socket.create_connection((LOOP, port), timeout=5) as s:
                        s.sendall(b"w")
                        s.recv(1)
                    time.sleep(0.5)
                    before = memory_kib(pgid)
                    client = spawn([self.tool("idleconns"), "--target", f"{LOOP}:{port}", "--count", str(n),
                                    "--hold-secs", "300"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   log_path=os.path.join(self.tmp, "idleconns.log"))
                    try:
                        lines = read_until_ready(client, timeout=120)
                        j = json.loads(lines[0])
                        time.sleep(1.0)  # let the proxy settle (buffers freed, threads idle)
                        after = memory_kib(pgid)
                        opened = j["opened"]
                        out = {"conns": n, "opened": opened, "failed": j["failed"],
                               "open_s": j["elapsed_s"], "before": before, "after": after,
                               "first_error": j.get("first_error")}
                        if opened:
                            out["rss_kib_per_conn"] = (after["rss_kib"] - before["rss_kib"]) / opened
                            out["pss_kib_per_conn"] = (after["pss_kib"] - before["pss_kib"]) / opened
                        return out
                    finally:
                        try:
                            client.stdin.close()
                        except OSError:
                            pass
                        try:
                            client.wait(timeout=30)
                        except subprocess.TimeoutExpired:
                            pass
                        kill(client)
                return self.with_proxy(c, srv.port, f"memory-r{r + 1}", body)

            # direct has no proxy process whose memory could be measured.
            self.interleaved("memory", [c for c in self.contenders if c.has_process], one)
        finally:
            srv.stop()


def read_until_ready(p: subprocess.Popen, timeout: float) -> list[str]:
    """Read p.stdout lines until 'READY' (bounded); returns the lines before it."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = p.stdout.fileno()
    while time.monotonic() < deadline:
        if b"READY\n" in buf:
            text = buf.decode(errors="replace")
            return [ln for ln in text.split("READY\n")[0].splitlines() if ln.strip()]
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"idleconns exited (code {p.poll()}) before READY: {buf[-300:]!r}")
            buf += chunk
    raise RuntimeError(f"idleconns: no READY after {timeout:.0f}s")


def parse_redis_csv(text: str) -> dict:
    """redis-benchmark --csv (Redis >= 7: test,rps,avg,min,p50,p95,p99,max in ms;
    older versions print only test,rps)."""
    tests = {}
    rows = list(csv.reader(io.StringIO(text)))
    header = None
    for row in rows:
        if not row:
            continue
        if row[0] == "test":
            header = row
            continue
        try:
            if header:
                d = dict(zip(header, row))
                entry = {"rps": float(d["rps"])}
                for key, name in (("avg_latency_ms", "avg_ms"), ("p50_latency_ms", "p50_ms"),
                                  ("p99_latency_ms", "p99_ms")):
                    if key in d:
                        entry[name] = float(d[key])
            else:
                entry = {"rps": float(row[1])}
        except (ValueError, KeyError, IndexError):
            continue
        tests[row[0].split(" ")[0]] = entry
    return tests


# --------------------------------------------------------------------------------------
# Summaries and tables
# --------------------------------------------------------------------------------------

def median_tree(rounds: list[dict]) -> dict:
    """Median of every numeric leaf across rounds (nested dicts handled)."""
    out: dict = {}
    keys: list[str] = []
    for r in rounds:
        for k in r:
            if k not in keys:
                keys.append(k)
    for k in keys:
        vals = [r[k] for r in rounds if k in r]
        if k == "round":
            continue
        if all(isinstance(v, dict) for v in vals):
            out[k] = median_tree(vals)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) and vals:
            out[k] = statistics.median(vals)
    return out


def fmt(v, spec: str) -> str:
    if v is None:
        return "–"
    return format(v, spec)


def md_table(title: str, names: list[str], med: dict, cols: list[tuple]) -> str:
    """cols: (header, getter(median_dict) -> value|None, format spec, [baseline names])."""
    headers = ["contender"]
    for h, _g, _f, bases in cols:
        headers.append(h)
        headers.extend(f"÷ {b}" for b in bases)
    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]

    def get(name, g):
        m = med.get(name)
        if m is None:
            return None
        try:
            return g(m)
        except (KeyError, TypeError):
            return None

    for name in names:
        if name not in med:
            continue
        cells = [name]
        for _h, g, f, bases in cols:
            v = get(name, g)
            cells.append(fmt(v, f))
            for b in bases:
                bv = get(b, g)
                cells.append(f"{v / bv:.2f}" if v is not None and bv else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def kernel_floor(med: dict, total_key: str, sys_key: str, what: str) -> str:
    """One line: each proxy's kernel time alone as a fraction of HAProxy's total CPU. A
    proxy that makes the same system calls cannot get its total below that fraction by
    any change to its own code."""
    base = med.get("haproxy", {}).get(total_key)
    if not base:
        return ""
    parts = []
    for name, m in med.items():
        if name in ("direct", "haproxy") or m.get(sys_key) is None:
            continue
        parts.append(f"{name} {m[sys_key] / base:.2f}")
    if not parts:
        return ""
    return (f"Kernel time alone {what}, as a fraction of HAProxy's total CPU {what}: "
            + ", ".join(parts) + ".\n")


def render(summary: dict, order: list[str]) -> str:
    out = []
    present = set(order)
    hsp = [b for b in ("haproxy-splice",) if b in present]
    hap = [b for b in ("haproxy",) if b in present]
    d = [b for b in ("direct",) if b in present]
    if "bulk" in summary:
        med = summary["bulk"]
        out.append(md_table("Bulk throughput, iperf3 1 stream (Gbit/s)", order, med,
                            [("Gbit/s", lambda m: m["p1_gbps"], ".2f", d + hap + hsp)]))
        out.append(md_table("Bulk throughput, iperf3 8 streams (Gbit/s)", order, med,
                            [("Gbit/s", lambda m: m["p8_gbps"], ".2f", d + hap + hsp)]))
        out.append(md_table("Proxy CPU per GB relayed during bulk (CPU s/GB, lower is better)",
                            [n for n in order if n != "direct"], med,
                            [("1 stream", lambda m: m["p1_cpu_s_per_gb"], ".3f", hap + hsp),
                             ("of which kernel", lambda m: m["p1_sys_s_per_gb"], ".3f", []),
                             ("8 streams", lambda m: m["p8_cpu_s_per_gb"], ".3f", hap + hsp)]))
    if "redis" in summary:
        med = summary["redis"]
        tests: list[str] = []
        for m in med.values():
            for t in m.get("tests", {}):
                if t not in tests:
                    tests.append(t)
        for t in tests:
            out.append(md_table(f"redis-benchmark {t} (requests/s; latency ms)", order, med,
                                [("req/s", lambda m, t=t: m["tests"][t]["rps"], ",.0f", d + hap),
                                 ("p50 ms", lambda m, t=t: m["tests"][t]["p50_ms"], ".3f", []),
                                 ("p99 ms", lambda m, t=t: m["tests"][t]["p99_ms"], ".3f", [])]))
        out.append(md_table("Proxy CPU per redis request (µs/req, lower is better)",
                            [n for n in order if n != "direct"], med,
                            [("µs/req", lambda m: m["cpu_us_per_req"], ".2f", hap),
                             ("of which kernel", lambda m: m["sys_us_per_req"], ".2f", hap)]))
        out.append(kernel_floor(med, "cpu_us_per_req", "sys_us_per_req", "per redis request"))
    if "connrate" in summary:
        med = summary["connrate"]
        out.append(md_table("Connection rate: connect + 64 B echo + close (connections/s)", order, med,
                            [("conn/s", lambda m: m["rate_per_s"], ",.0f", d + hap),
                             ("p99 ms", lambda m: m["p99_ms"], ".2f", []),
                             ("errors", lambda m: m["errors"], ".0f", [])]))
        out.append(md_table("Proxy CPU per connection (µs/conn, lower is better)",
                            [n for n in order if n != "direct"], med,
                            [("µs/conn", lambda m: m["cpu_us_per_conn"], ".1f", hap),
                             ("of which kernel", lambda m: m["sys_us_per_conn"], ".1f", hap)]))
        out.append(kernel_floor(med, "cpu_us_per_conn", "sys_us_per_conn", "per connection"))
    if "memory" in summary:
        med = summary["memory"]
        out.append(md_table("Memory per idle relayed connection (KiB/conn, lower is better)",
                            [n for n in order if n != "direct"], med,
                            [("RSS KiB/conn", lambda m: m["rss_kib_per_conn"], ".2f", hap),
                             ("PSS KiB/conn", lambda m: m["pss_kib_per_conn"], ".2f", hap),
                             ("conns", lambda m: m["opened"], ".0f", []),
                             ("failed", lambda m: m["failed"], ".0f", [])]))
        if "socat" in med:
            out.append("socat forks one process per connection: summed RSS counts the pages those "
                       "processes share once per process, so its PSS column is the meaningful one.\n")
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

def build(args) -> tuple[str | None, str | None]:
    """Build ferry and the tools. Returns (ferry_error, tools_error)."""
    if args.no_build:
        return None, None
    ferry_err = tools_err = None
    log("building bench tools (cargo build --release --manifest-path bench/tools/Cargo.toml)")
    try:
        r = run_capture(["cargo", "build", "--release", "--manifest-path", TOOLS_MANIFEST], timeout=1800, cwd=ROOT)
        if r.returncode != 0:
            tools_err = "bench tools build failed:\n" + "\n".join(r.stderr.strip().splitlines()[-15:])
    except (subprocess.TimeoutExpired, OSError) as e:
        tools_err = f"bench tools build failed: {e}"
    if "ferry" in args.contenders:
        log("building ferry (cargo build --release)")
        try:
            r = run_capture(["cargo", "build", "--release"], timeout=1800, cwd=ROOT)
            if r.returncode != 0:
                lines = r.stderr.strip().splitlines()
                errs = [ln.strip() for ln in lines if ln.startswith("error")] or lines[-3:]
                ferry_err = "cargo build --release failed: " + " | ".join(errs[:3])
        except (subprocess.TimeoutExpired, OSError) as e:
            ferry_err = f"cargo build --release failed: {e}"
    return ferry_err, tools_err


def tool_versions() -> dict:
    def first(cmd, both=False):
        try:
            r = run_capture(cmd, timeout=10)
            text = (r.stdout + r.stderr) if both else r.stdout
            return text.strip().splitlines()[0].strip()
        except (subprocess.TimeoutExpired, OSError, IndexError):
            return None
    return {
        "iperf3": first(["iperf3", "--version"]),
        "redis-server": first(["redis-server", "--version"]),
        "redis-benchmark": first(["redis-benchmark", "--version"]),
        "rustc": first(["rustc", "--version"]),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="ferry benchmark harness (loopback only)")
    ap.add_argument("--quick", action="store_true", help="short smoke run (~2 s per measurement, 1 round)")
    ap.add_argument("--rounds", type=int, help="rounds per measurement (default 3, quick 1)")
    ap.add_argument("--only", default=",".join(ALL_MEASUREMENTS),
                    help="comma-separated measurements: " + ",".join(ALL_MEASUREMENTS))
    ap.add_argument("--contenders", default=",".join(ALL_CONTENDERS),
                    help="comma-separated contenders: " + ",".join(ALL_CONTENDERS))
    ap.add_argument("--out", help="JSON results path (default bench/results/<timestamp>.json)")
    ap.add_argument("--no-build", action="store_true", help="use existing binaries, do not run cargo")
    ap.add_argument("--ferry-mode", choices=["config", "quick"], default="config",
                    help="start ferry with a TOML config (default) or --listen/--upstream")
    ap.add_argument("--mem-conns", type=int, help="idle connections for the memory test")
    ap.add_argument("--bulk-secs", type=int, help="iperf3 duration per stream count")
    ap.add_argument("--connrate-secs", type=float, help="connrate duration")
    ap.add_argument("--redis-requests", type=int, help="redis-benchmark -n")
    a = ap.parse_args(argv)
    a.only = [m.strip() for m in a.only.split(",") if m.strip()]
    a.contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    for m in a.only:
        if m not in ALL_MEASUREMENTS:
            ap.error(f"unknown measurement {m!r}")
    for c in a.contenders:
        if c not in ALL_CONTENDERS:
            ap.error(f"unknown contender {c!r}")
    if a.rounds is not None and not 1 <= a.rounds <= 50:
        ap.error("--rounds must be 1..50")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    prof = dict(PROFILES["quick" if args.quick else "full"])
    if args.rounds:
        prof["rounds"] = args.rounds
    for key in ("mem_conns", "bulk_secs", "connrate_secs", "redis_requests"):
        if getattr(args, key) is not None:
            prof[key] = getattr(args, key)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    _child_setup()  # raise our own soft nofile limit too; children inherit it
    become_subreaper()
    fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    started = datetime.datetime.now(datetime.timezone.utc)
    out_path = args.out or os.path.join(
        BENCH_DIR, "results", started.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

    # Required external tools per measurement.
    needs = {"bulk": ["iperf3"], "redis": ["redis-server", "redis-benchmark"], "connrate": [], "memory": []}
    measurements = []
    skipped_measurements = {}
    for m in args.only:
        missing = [t for t in needs[m] if not shutil.which(t)]
        if missing:
            skipped_measurements[m] = "missing " + ", ".join(missing) + " (run bench/setup.sh)"
            log(f"SKIP measurement {m}: {skipped_measurements[m]}")
        else:
            measurements.append(m)

    tmp = tempfile.mkdtemp(prefix="ferry-bench-")
    result: dict = {}
    try:
        with open("/proc/loadavg") as f:
            load_before = f.read().split()[:3]
        if float(load_before[0]) > 0.7:
            log(f"WARNING: load average {load_before[0]}: something else is using the CPUs; numbers will be noisy")

        ferry_err, tools_err = build(args)
        if tools_err and any(m in measurements for m in ("connrate", "memory")):
            log(tools_err)
            for m in ("connrate", "memory"):
                if m in measurements:
                    measurements.remove(m)
                    skipped_measurements[m] = "bench tools failed to build"
        for t in ("echo", "connrate", "idleconns"):
            if not os.access(os.path.join(TOOLS_BIN, t), os.X_OK):
                for m in ("connrate", "memory"):
                    if m in measurements:
                        measurements.remove(m)
                        skipped_measurements[m] = f"{TOOLS_BIN}/{t} missing"
                        log(f"SKIP measurement {m}: {skipped_measurements[m]}")

        all_c: dict[str, Contender] = {
            "direct": Direct(tmp, fd_hard),
            "ferry": Ferry(tmp, fd_hard, ferry_err, args.ferry_mode),
            "haproxy": HAProxy(tmp, fd_hard, splice=False),
            "haproxy-splice": HAProxy(tmp, fd_hard, splice=True),
            "nginx": Nginx(tmp, fd_hard),
            "socat": Socat(tmp, fd_hard),
        }
        contenders: list[Contender] = []
        skipped: dict[str, str] = {}
        versions: dict[str, str] = {}
        for name in args.contenders:
            c = all_c[name]
            why = c.available()
            if why:
                skipped[name] = why
                log(f"SKIP contender {name}: {why}")
            else:
                contenders.append(c)
                v = c.version()
                if v:
                    versions[name] = v
        versions.update({k: v for k, v in tool_versions().items() if v})

        result = {
            "date": started.isoformat(timespec="seconds"),
            "machine": {"nproc": os.cpu_count(), "hostname": platform.node(), "kernel": platform.release(),
                        "nofile_hard": fd_hard, "loadavg_at_start": load_before},
            "profile": "quick" if args.quick else "full",
            "params": prof,
            "measurements": measurements,
            "skipped_measurements": skipped_measurements,
            "contenders": [c.name for c in contenders],
            "skipped_contenders": skipped,
            "versions": versions,
            "rounds": {},
            "median": {},
            "errors": [],
            "complete": False,
        }
        bench = Bench(args, prof, tmp, contenders)
        try:
            for m in measurements:
                t0 = time.monotonic()
                try:
                    getattr(bench, m)()
                except Exception as e:  # noqa: BLE001 - e.g. a backend failed to start
                    msg = f"{m}: {type(e).__name__}: {e}"
                    log("ERROR " + msg)
                    bench.errors.append(msg)
                log(f"{m} done in {time.monotonic() - t0:.0f}s")
            result["complete"] = True
        finally:
            result["rounds"] = bench.raw
            result["median"] = {m: {c: median_tree(rs) for c, rs in per.items()} for m, per in bench.raw.items()}
            result["errors"] = bench.errors
            result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            tmp_out = out_path + ".tmp"
            with open(tmp_out, "w") as f:
                json.dump(result, f, indent=2, sort_keys=False)
                f.write("\n")
            os.replace(tmp_out, out_path)

        order = [c.name for c in contenders]
        print(f"## ferry benchmark {result['date']} ({result['profile']}, {prof['rounds']} round(s), "
              f"nproc {result['machine']['nproc']}, medians)\n")
        print("`÷ X` columns are this contender's value divided by X's (for throughput higher is "
              "better, for CPU, memory and latency lower is better).\n")
        print(render(result["median"], order))
        if skipped:
            print("Skipped contenders:")
            for k, v in skipped.items():
                print(f"- {k}: {v}")
            print()
        if skipped_measurements:
            print("Skipped measurements:")
            for k, v in skipped_measurements.items():
                print(f"- {k}: {v}")
            print()
        if bench.errors:
            print("Errors:")
            for e in bench.errors:
                print("- " + e.splitlines()[0])
            print()
        seen: dict[str, list[str]] = {}
        for k, v in versions.items():
            seen.setdefault(v, []).append(k)
        print("Versions: " + "; ".join(f"{'/'.join(ks)}: {v}" for v, ks in seen.items()))
        print(f"\nJSON: {os.path.relpath(out_path)}")
        return 0 if not bench.errors else 1
    finally:
        kill_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        kill_all()
        sys.exit(130)
