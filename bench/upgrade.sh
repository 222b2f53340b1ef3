#!/usr/bin/env bash
# Upgrades under load: one ferry (2 workers) in front of bench/tools `echo` on loopback,
# `connrate` (64 workers, connect → 64 B echoed → close, back to back) for DURATION
# seconds, and meanwhile UPGRADES SIGUSR2 upgrades, each sent to the pid that /api/status
# reports (the serving process), SPACING seconds apart. Prints connrate's JSON line (its
# "errors" counts every refused, reset, timed-out or short connection) and how many ferry
# processes are left at the end (1). Stops everything it started.
#
#   bench/upgrade.sh [UPGRADES] [SPACING] [DURATION]      (default 5 3 20)
set -euo pipefail
cd "$(dirname "$0")/.."
upgrades=${1:-5}
spacing=${2:-3}
duration=${3:-20}
ferry=target/release/ferry
tools=bench/tools/target/release
[ -x "$ferry" ] || cargo build --release
[ -x "$tools/connrate" ] && [ -x "$tools/echo" ] ||
    cargo build --release --manifest-path bench/tools/Cargo.toml

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    pkill -TERM -f "$work/ferry.toml" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo_port=$(port); front=$(port); admin=$(port)
cat > "$work/ferry.toml" <<TOML
[global]
workers = 2
drain_timeout = "30s"
[admin]
listen = "127.0.0.1:$admin"
[log]
access = "off"
level = "warn"
[[listener]]
name = "front"
listen = ["127.0.0.1:$front"]
upstream = "echo"
[[upstream]]
name = "echo"
servers = ["127.0.0.1:$echo_port"]
TOML

"$tools/echo" --listen "127.0.0.1:$echo_port" >"$work/echo.log" 2>&1 &
pids+=($!)
"$PWD/$ferry" run --config "$work/ferry.toml" >"$work/ferry.log" 2>&1 &
serving() {
    curl -sf "http://127.0.0.1:$admin/api/status" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["process"]["pid"])'
}
for _ in $(seq 100); do serving >/dev/null 2>&1 && break; sleep 0.1; done
serving >/dev/null

"$tools/connrate" --target "127.0.0.1:$front" --workers 64 --duration "$duration" \
    >"$work/connrate.json" &
load=$!
for i in $(seq "$upgrades"); do
    sleep "$spacing"
    pid=$(serving)
    echo "upgrade $i: SIGUSR2 to pid $pid" >&2
    kill -USR2 "$pid"
    # Counted only once another process serves.
    for _ in $(seq 100); do [ "$(serving 2>/dev/null)" != "$pid" ] && break; sleep 0.1; done
    [ "$(serving)" != "$pid" ] || { echo "upgrade $i: pid $pid still serving" >&2; exit 1; }
done
wait "$load"
cat "$work/connrate.json"; echo
# The old processes have drained (their connections were short).
for _ in $(seq 100); do
    [ "$(pgrep -c -f "$work/ferry.toml")" -le 1 ] && break
    sleep 0.1
done
echo "ferry processes left: $(pgrep -c -f "$work/ferry.toml")" >&2
