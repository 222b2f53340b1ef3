#!/usr/bin/env bash
# Screenshot of ferry's stats page against the fake API of serve.py, with headless Chromium.
#
#   tools/stats-preview/shot.sh [OUT.png]          (default /tmp/ferry-stats.png)
#
# Environment:
#   WIDTH, HEIGHT   window size (default 1400x1000)
#   BUDGET          virtual time in ms the page runs before the shot (default 8000; polls
#                   are every 2 s, so 8000 = 4 polls; 60000 fills a minute of chart)
#   DARK=1          emulate prefers-color-scheme: dark
#   TOKEN=...       start serve.py with --token
#   FAIL_AFTER=N    serve.py answers 503 after N polls (shows the error banner)
#   SERVE_ARGS      more arguments for serve.py
#
# Also writes OUT.dom.html (the rendered DOM) and OUT.console.log (Chromium's log), checks
# that the server addresses were rendered, and fails if the page logged a JS error.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-/tmp/ferry-stats.png}
width=${WIDTH:-1400}
height=${HEIGHT:-1000}
budget=${BUDGET:-8000}

chromium=${CHROMIUM:-}
if [ -z "$chromium" ]; then
  for c in chromium chromium-browser google-chrome; do
    if command -v "$c" >/dev/null 2>&1; then chromium=$(command -v "$c"); break; fi
  done
fi
if [ -z "$chromium" ]; then
  echo "shot.sh: no Chromium found; install it with: apt-get update && apt-get install -y chromium" >&2
  exit 1
fi

tmp=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

serve_args=(--port 0 --step 2)
[ -n "${TOKEN:-}" ] && serve_args+=(--token "$TOKEN")
[ -n "${FAIL_AFTER:-}" ] && serve_args+=(--fail-after "$FAIL_AFTER")
# shellcheck disable=SC2206
[ -n "${SERVE_ARGS:-}" ] && serve_args+=($SERVE_ARGS)

# A fresh server (and so fresh simulated counters) for each Chromium run.
start_server() {
  python3 "$here/serve.py" "${serve_args[@]}" "$@" >"$tmp/serve.out" 2>"$tmp/serve.err" &
  server_pid=$!
  url=
  for _ in $(seq 100); do
    url=$(head -n1 "$tmp/serve.out" 2>/dev/null || true)
    [ -n "$url" ] && return 0
    if ! kill -0 "$server_pid" 2>/dev/null; then cat "$tmp/serve.err" >&2; exit 1; fi
    sleep 0.1
  done
  echo "shot.sh: serve.py did not start" >&2
  exit 1
}
stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}

flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync
  --hide-scrollbars --window-size="$width,$height" --virtual-time-budget="$budget"
  --enable-logging=stderr --v=0)
if [ "${DARK:-0}" = 1 ]; then
  flags+=(--force-dark-mode --blink-settings=preferredColorScheme=0)
fi

log="${out%.png}.console.log"
dom="${out%.png}.dom.html"
start_server
"$chromium" "${flags[@]}" --user-data-dir="$tmp/profile-shot" --screenshot="$out" "$url" >/dev/null 2>"$log" || true
stop_server
start_server
"$chromium" "${flags[@]}" --user-data-dir="$tmp/profile-dom" --dump-dom "$url" >"$dom" 2>>"$log" || true
stop_server

status=0
if [ ! -s "$out" ]; then echo "shot.sh: no screenshot written; see $log" >&2; status=1; fi
if grep -E 'CONSOLE|Uncaught|console' "$log" | grep -Eiv 'favicon' | grep -Ei 'error|uncaught' >&2; then
  echo "shot.sh: the page logged errors (above); full log in $log" >&2
  status=1
fi
[ -n "${FAIL_AFTER:-}" ] && [ "$FAIL_AFTER" = 0 ] && { echo "$out"; exit "$status"; }   # nothing to render
for addr in 10.0.0.11:5432 10.0.0.12:5432 '[fd00::21]:8443' 10.0.1.22:8443 10.0.1.23:8443; do
  if ! grep -qF "$addr" "$dom"; then echo "shot.sh: $addr missing from the rendered DOM ($dom)" >&2; status=1; fi
done
[ "$status" = 0 ] && echo "$out"
exit "$status"
