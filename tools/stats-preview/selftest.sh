#!/usr/bin/env bash
# Drives the stats page in headless Chromium against serve.py (with --token, --evil names
# and selftest.js injected): token prompt on 401, drain/disable/enable with URL-encoded
# paths, escaping of API strings, pause/resume, no JS errors. Prints the report and exits
# non-zero on failure.
#
#   tools/stats-preview/selftest.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
chromium=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
[ -n "$chromium" ] || { echo "selftest.sh: no Chromium; apt-get install -y chromium" >&2; exit 1; }

tmp=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

python3 "$here/serve.py" --port 0 --step 2 --token s3cret --evil --inject "$here/selftest.js" >"$tmp/out" 2>"$tmp/err" &
server_pid=$!
url=
for _ in $(seq 100); do
  url=$(head -n1 "$tmp/out" 2>/dev/null || true)
  [ -n "$url" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/err" >&2; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "selftest.sh: serve.py did not start" >&2; exit 1; }

"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$tmp/profile" --window-size=1400,1000 --virtual-time-budget=90000 \
  --enable-logging=stderr --v=0 --dump-dom "$url" >"$tmp/dom.html" 2>"$tmp/chromium.log" || true

report=$(python3 - "$tmp/dom.html" <<'PY'
import html, re, sys
dom = open(sys.argv[1], encoding="utf-8", errors="replace").read()
m = re.findall(r'<pre id="selftest">(SELFTEST .*?)</pre>', dom, re.S)
print(html.unescape(m[-1]).rstrip() if m else "SELFTEST FAIL\nno report in the DOM (the test did not finish in the virtual-time budget)")
PY
)
echo "$report"
status=0
grep -q '^SELFTEST PASS' <<<"$report" || status=1
if grep -Ei 'Uncaught|CONSOLE.*error' "$tmp/chromium.log" >&2; then
  echo "selftest.sh: JS errors in Chromium's log (above)" >&2
  status=1
fi
exit "$status"
