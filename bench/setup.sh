#!/usr/bin/env bash
# Install the benchmark's Debian packages (idempotent). Run as root (or with sudo).
#   haproxy, nginx + stream module, redis (redis-server, redis-benchmark), iperf3, socat
set -euo pipefail

PKGS=(haproxy nginx libnginx-mod-stream redis-server redis-tools iperf3 socat iproute2)

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

for b in haproxy nginx redis-server redis-benchmark iperf3 socat; do
    if ! command -v "$b" >/dev/null 2>&1; then
        echo "setup.sh: $b still missing after install" >&2
        exit 1
    fi
done
ls /usr/lib/nginx/modules/ngx_stream_module.so >/dev/null 2>&1 \
    || dpkg -L libnginx-mod-stream | grep -q 'ngx_stream_module.so' \
    || { echo "setup.sh: nginx stream module not found" >&2; exit 1; }
echo "setup.sh: ok"
