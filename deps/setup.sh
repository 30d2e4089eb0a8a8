#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine, run as root: Debian packages from
# deps/runtime-packages.txt (what an installed bootd needs: the .deb's Depends) and
# deps/test-packages.txt (building and testing), then a venv made from Debian's python3 with --system-site-packages
# (so python3-libnbd and python3-systemd import), then `pip install -e .[test,lint]`.
# Every step is skipped when its result is already there (stamp files under .venv/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PKGS=$(cat deps/runtime-packages.txt deps/test-packages.txt | grep -v '^\s*#' | awk 'NF{print $1}' | sort -u)

missing=()
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}"
  # Never start the servers we install as host services: policy-rc.d exiting 101 makes
  # invoke-rc.d (and so every postinst) refuse to start anything while we install.
  had_policy=0
  [ -e /usr/sbin/policy-rc.d ] && had_policy=1 && cp -a /usr/sbin/policy-rc.d /usr/sbin/policy-rc.d.bootd-saved
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  restore() {
    if [ $had_policy = 1 ]; then mv -f /usr/sbin/policy-rc.d.bootd-saved /usr/sbin/policy-rc.d; else rm -f /usr/sbin/policy-rc.d; fi
  }
  trap restore EXIT
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/bootd-apt.log 2>&1; then
    apt-get update -q >>/tmp/bootd-apt.log 2>&1
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/bootd-apt.log 2>&1 \
      || { tail -30 /tmp/bootd-apt.log; exit 1; }
  fi
  restore; trap - EXIT
  # Nothing is killed here: the policy-rc.d above keeps every postinst from starting a server, and a
  # real server may run other dnsmasq/nginx/kea processes that are not ours to stop.
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating venv $VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp=$VENV/.bootd-installed
if [ ! -e "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: pip install -e .[test,lint]"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[test,lint]"
  touch "$stamp"
fi
