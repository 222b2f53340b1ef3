#!/usr/bin/env python3
"""Preview server for ferry's stats page (src/admin/stats.html), standard library only.

Serves the page at `/`, a fake `GET /api/status` whose counters grow over time, and the
`POST /api/upstreams/{upstream}/servers/{addr}/{drain|enable|disable}` endpoints, shaped
like the real admin API in src/admin/mod.rs.

    python3 tools/stats-preview/serve.py                # pick a free port, print the URL
    python3 tools/stats-preview/serve.py --port 8099 --token s3cret
    python3 tools/stats-preview/serve.py --step 2       # each status poll advances 2 s of
                                                        # simulated time (for headless
                                                        # screenshots with virtual time)
    python3 tools/stats-preview/serve.py --fail-after 5 # status answers 503 after 5 polls
    python3 tools/stats-preview/serve.py --inject t.js  # append a script to the page

The page is read from disk on every request, so edits show up on reload.
"""

import argparse
import json
import math
import os
import random
import sys
import threading
import time
from datetime import datetime, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PAGE = os.path.normpath(os.path.join(HERE, "..", "..", "src", "admin", "stats.html"))

RESULTS = ["ok", "limited", "denied", "no_server", "queue_timeout", "connect_failed",
           "connect_timeout", "idle_timeout", "client_reset", "server_reset",
           "protocol_error", "drained"]


class Server:
    def __init__(self, addr, weight=1, backup=False, configured=None, health=True,
                 admin="enabled", checks=True, reason=""):
        self.addr = addr
        self.configured = configured or addr
        self.weight = weight
        self.backup = backup
        self.health = health          # last health check result
        self.admin = admin            # enabled | draining | disabled
        self.checks = checks          # health checks configured?
        self.reason = reason
        self.active = 0.0
        self.total = 0.0
        self.up = 0.0
        self.down = 0.0
        self.failures = 0.0
        self.check_at = None          # simulated wall-clock seconds
        self.check_ms = 0.0

    def state(self):
        if self.admin == "disabled":
            return "disabled"
        if self.admin == "draining":
            return "draining"
        return "up" if self.health else "down"

    def eligible(self):
        return self.state() == "up"


class Sim:
    """A small, deterministic-enough model of two listeners and two pools."""

    def __init__(self, step=None, fail_after=None, seed=7, evil=False):
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.step = step
        self.fail_after = fail_after
        self.polls = 0
        self.real0 = time.time()
        self.wall0 = self.real0
        self.t = 0.0                   # simulated seconds since the preview started
        self.last_real = time.monotonic()
        self.base_uptime = 3 * 3600 + 12 * 60 + 7.25
        self.upstreams = [
            {"name": "pg-pool", "balance": "round_robin", "queued": 0, "sticky": 0,
             "servers": [
                 Server("10.0.0.11:5432", weight=2),
                 Server("10.0.0.12:5432", configured="pg-b.db.internal:5432", admin="draining"),
             ]},
            {"name": "web-backends", "balance": "least_conn", "queued": 0, "sticky": 0,
             "servers": [
                 Server("[fd00::21]:8443", weight=3),
                 Server("10.0.1.22:8443", health=False,
                        reason="connect: Connection refused (os error 111)"),
                 Server("10.0.1.23:8443", backup=True, admin="disabled", checks=False),
             ]},
        ]
        # rate: new connections/s; dur: mean connection life (s); up/down: bytes/s per conn
        self.listeners = [
            {"name": "pg", "addrs": ["0.0.0.0:5432", "[::]:5432"], "upstream": "pg-pool",
             "rate": 3.0, "dur": 40.0, "bup": 900.0, "bdown": 21000.0,
             "mix": {"idle_timeout": 0.01, "client_reset": 0.004}},
            {"name": "web-tls", "addrs": ["0.0.0.0:443"], "upstream": "web-backends",
             "rate": 95.0, "dur": 0.6, "bup": 6000.0, "bdown": 180000.0,
             "mix": {"limited": 0.01, "denied": 0.002, "client_reset": 0.006,
                     "server_reset": 0.001}},
        ]
        if evil:
            # Names that would break a page that builds HTML from API strings, and an
            # upstream name that needs URL-encoding (space, slash, non-ASCII).
            web = self.pool("web-backends")
            web["name"] = "web <b>backends</b>/€"
            self.listeners[1]["upstream"] = web["name"]
            self.listeners[1]["name"] = "<img src=x onerror=\"window.__xss=1\">"
            web["servers"][2].configured = "<script>window.__xss=2</script>:8443"
        for l in self.listeners:
            l["results"] = {k: 0.0 for k in RESULTS}
            l["active"] = 0.0
            l["up"] = l["down"] = 0.0
        # Some history so the numbers do not start at zero: every server took traffic for
        # a while, then got its state (drained, disabled, failing checks) a bit before now.
        final = {}
        for up in self.upstreams:
            for s in up["servers"]:
                final[s.addr] = (s.admin, s.health)
                s.admin, s.health = "enabled", True
        self.advance(560.0, warmup=True)
        for up in self.upstreams:
            for s in up["servers"]:
                s.admin, s.health = final[s.addr]
        self.advance(40.0, warmup=True)
        for up in self.upstreams:
            for s in up["servers"]:
                if s.checks:
                    s.check_at = self.wall() - self.rng.uniform(0.5, 4.5)
                    s.check_ms = self.rng.uniform(0.2, 1.5) if s.health else 2000.0

    def wall(self):
        return self.wall0 + self.t

    def pool(self, name):
        for u in self.upstreams:
            if u["name"] == name:
                return u
        return None

    def tick(self):
        """Advance to now (real time) or by one step (stepped mode)."""
        now = time.monotonic()
        dt = self.step if self.step is not None else now - self.last_real
        self.last_real = now
        if dt > 0:
            self.advance(dt)

    def advance(self, dt, warmup=False):
        rng = self.rng
        remaining = dt
        while remaining > 1e-9:
            h = min(0.25, remaining)
            remaining -= h
            self.t += h
            load = 1.0 + 0.45 * math.sin(2 * math.pi * self.t / 150.0) \
                + 0.2 * math.sin(2 * math.pi * self.t / 37.0) + rng.uniform(-0.08, 0.08)
            load = max(0.1, load)
            for l in self.listeners:
                pool = self.pool(l["upstream"])
                new = l["rate"] * load * h
                prim = [s for s in pool["servers"] if s.eligible() and not s.backup]
                cand = prim or [s for s in pool["servers"] if s.eligible()]
                if not cand:
                    l["results"]["no_server"] += new
                else:
                    wsum = sum(s.weight for s in cand)
                    for s in cand:
                        share = new * s.weight / wsum
                        s.total += share
                        s.active += share
                # Connections end at 1/dur per second; draining servers lose theirs faster.
                finished = 0.0
                for s in pool["servers"]:
                    jitter = rng.uniform(0.85, 1.15)
                    s.up += s.active * l["bup"] * h * jitter
                    s.down += s.active * l["bdown"] * h * jitter
                    life = l["dur"]
                    gone = s.active * (1.0 - math.exp(-h / life))
                    if s.admin == "disabled":
                        gone = s.active
                    s.active -= gone
                    finished += gone
                    if s.active < 0.2 and s.admin != "enabled":
                        finished += s.active
                        s.active = 0.0
                for kind, frac in l["mix"].items():
                    l["results"][kind] += finished * frac
                l["results"]["ok"] += finished * (1 - sum(l["mix"].values()))
                # The down server still gets the odd retry that fails.
                for s in pool["servers"]:
                    if not s.health and s.admin == "enabled" and rng.random() < 0.25 * h:
                        s.failures += 1
                        l["results"]["connect_failed"] += 1
                l["active"] = sum(s.active for s in pool["servers"])
                l["up"] = sum(s.up for s in pool["servers"])
                l["down"] = sum(s.down for s in pool["servers"])
            web = self.upstreams[1]
            web["queued"] = rng.choice([0, 0, 0, 0, 1, 2]) if load > 1.3 else 0
        if not warmup:
            # Health checks every 5 s of simulated time.
            w = self.wall()
            for up in self.upstreams:
                for s in up["servers"]:
                    if s.checks and (s.check_at is None or w - s.check_at >= 5.0):
                        s.check_at = w - rng.uniform(0, 0.5)
                        s.check_ms = rng.uniform(0.2, 1.8) if s.health else 2000.0 + rng.uniform(0, 3)

    def status(self):
        ups = []
        for u in self.upstreams:
            servers = []
            for s in u["servers"]:
                last = None
                if s.checks and s.check_at is not None:
                    at = datetime.fromtimestamp(s.check_at, tz=timezone.utc)
                    last = {"ok": s.health, "reason": "" if s.health else s.reason,
                            "at": at.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (at.microsecond // 1000),
                            "duration_ms": round(s.check_ms, 3)}
                servers.append({
                    "addr": s.addr, "configured": s.configured, "state": s.state(),
                    "weight": s.weight, "backup": s.backup,
                    "connections_active": int(round(s.active)),
                    "connections_total": int(s.total), "bytes_up": int(s.up),
                    "bytes_down": int(s.down), "connect_failures": int(s.failures),
                    "last_check": last,
                })
            ups.append({"name": u["name"], "balance": u["balance"], "queued": u["queued"],
                        "sticky_entries": u["sticky"], "servers": servers})
        ls = []
        for l in self.listeners:
            results = {k: int(v) for k, v in l["results"].items()}
            tls = None
            routes = [{"route": "default", "upstream": l["upstream"], "matches": sum(results.values())}]
            if l["addrs"] == ["0.0.0.0:443"]:
                # Terminated TLS: a default certificate, one chosen by SNI that expires soon,
                # and a route (shaped like src/admin/mod.rs).
                tls = {
                    "handshakes": {"ok": 1200, "resumed": 3400, "failed": 7},
                    "certificates": [
                        {"name": "default", "subject": "CN=www.example.com",
                         "names": ["www.example.com"], "not_before": "2026-09-01T00:00:00Z",
                         "not_after": "2027-03-01T00:00:00Z", "expires_in_days": 89},
                        {"name": "*.api.example.com", "subject": "CN=*.api.example.com",
                         "names": ["*.api.example.com"], "not_before": "2026-09-10T00:00:00Z",
                         "not_after": "2026-12-10T00:00:00Z", "expires_in_days": 8},
                    ],
                }
                routes.insert(0, {"route": "1", "upstream": "pg-pool", "matches": 17})
            ls.append({
                "name": l["name"], "addrs": l["addrs"], "mode": "tls" if tls else "tcp",
                "upstream": l["upstream"], "routes": routes, "tls": tls,
                "connections_active": sum(s["connections_active"] for s in
                                          next(u for u in ups if u["name"] == l["upstream"])["servers"]),
                "connections_total": sum(results.values()),
                "bytes_up": int(l["up"]), "bytes_down": int(l["down"]),
                "results": results,
            })
        return {
            "version": "0.1.0",
            "uptime_seconds": round(self.base_uptime + self.t, 3),
            "process": {
                "connections_active": sum(l["connections_active"] for l in ls),
                "connections_total": sum(l["connections_total"] for l in ls),
                "bytes_up": sum(l["bytes_up"] for l in ls),
                "bytes_down": sum(l["bytes_down"] for l in ls),
                "max_connections": 100000,
            },
            "listeners": ls,
            "upstreams": ups,
        }

    def action(self, upstream, addr, action):
        u = self.pool(upstream)
        if u is None:
            return 404, {"error": "no upstream %s" % json.dumps(upstream)}
        matching = [s for s in u["servers"] if s.addr == addr or s.configured == addr]
        if not matching:
            return 404, {"error": "upstream %s has no server %s" % (json.dumps(upstream), json.dumps(addr))}
        new = {"drain": "draining", "enable": "enabled", "disable": "disabled"}[action]
        for s in matching:
            s.admin = new
        return 200, {"upstream": upstream,
                     "servers": [{"addr": s.addr, "state": s.state()} for s in matching]}


class Handler(BaseHTTPRequestHandler):
    server_version = "ferry-preview"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet unless asked
        if self.server.verbose:
            sys.stderr.write("%s %s\n" % (self.log_date_time_string(), fmt % args))

    def date_time_string(self, timestamp=None):
        # In stepped mode the Date header follows the simulated clock, like the browser's
        # virtual clock does.
        sim = self.server.sim
        if sim.step is not None and timestamp is None:
            return formatdate(sim.wall(), usegmt=True)
        return super().date_time_string(timestamp)

    def send(self, status, body, ctype="application/json", extra=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def segments(self):
        path = urlsplit(self.path).path
        return path, path.strip("/").split("/")

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path, segs = self.segments()
        sim = self.server.sim
        if segs == [""]:
            try:
                with open(self.server.page, "rb") as f:
                    page = f.read()
            except OSError as e:
                return self.send(500, {"error": "cannot read the page: %s" % e})
            if self.server.inject:
                with open(self.server.inject, "rb") as f:
                    extra = b"<script>\n" + f.read() + b"\n</script>\n"
                i = page.rfind(b"</body>")
                page = page[:i] + extra + page[i:] if i >= 0 else page + extra
            return self.send(200, page, "text/html; charset=utf-8")
        if segs == ["api", "status"]:
            with sim.lock:
                sim.polls += 1
                if sim.fail_after is not None and sim.polls > sim.fail_after:
                    return self.send(503, {"error": "simulated outage (--fail-after %d)" % sim.fail_after})
                sim.tick()
                body = sim.status()
            return self.send(200, body)
        if len(segs) == 6 and segs[:2] == ["api", "upstreams"] and segs[3] == "servers":
            return self.send(405, {"error": "use POST"}, extra={"Allow": "POST"})
        return self.send(404, {"error": "no such endpoint: %s" % path})

    def do_POST(self):
        path, segs = self.segments()
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        if len(segs) == 6 and segs[:2] == ["api", "upstreams"] and segs[3] == "servers":
            token = self.server.token
            if token is not None and self.headers.get("Authorization") != "Bearer " + token:
                return self.send(401, {"error": "this admin server requires `Authorization: Bearer <token>` on POST"},
                                 extra={"WWW-Authenticate": "Bearer"})
            action = segs[5]
            if action not in ("drain", "enable", "disable"):
                return self.send(404, {"error": "unknown action %s: use drain, enable or disable" % json.dumps(action)})
            upstream, addr = unquote(segs[2]), unquote(segs[4])
            with self.server.sim.lock:
                self.server.sim.tick()
                status, body = self.server.sim.action(upstream, addr, action)
            return self.send(status, body)
        if segs in (["api", "status"], [""]):
            return self.send(405, {"error": "use GET"}, extra={"Allow": "GET"})
        return self.send(404, {"error": "no such endpoint: %s" % path})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0 = a free one, printed)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--token", default=None, help="require `Authorization: Bearer TOKEN` on POST")
    ap.add_argument("--page", default=DEFAULT_PAGE, help="the HTML file served at / (default: %(default)s)")
    ap.add_argument("--step", type=float, default=None,
                    help="advance simulated time by this many seconds per status poll instead of real time")
    ap.add_argument("--fail-after", type=int, default=None, help="answer 503 to status polls after this many")
    ap.add_argument("--inject", default=None,
                    help="append this JavaScript file to the page (used by selftest.sh)")
    ap.add_argument("--evil", action="store_true",
                    help="use names with HTML and characters that need URL-encoding (selftest.sh)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("-v", "--verbose", action="store_true", help="log requests to stderr")
    args = ap.parse_args()

    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    httpd.daemon_threads = True
    httpd.sim = Sim(step=args.step, fail_after=args.fail_after, seed=args.seed, evil=args.evil)
    httpd.page = args.page
    httpd.token = args.token
    httpd.inject = args.inject
    httpd.verbose = args.verbose
    host, port = httpd.server_address[:2]
    shown = "[%s]" % host if ":" in host else host
    print("http://%s:%d/" % (shown, port), flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()
