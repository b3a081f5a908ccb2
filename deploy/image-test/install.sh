#!/usr/bin/env bash
# Debian's Docker engine (docker.io: dockerd, containerd, runc, iptables) and debootstrap, for
# deploy/image-test/run.sh. Installed with apt-get when missing and this runs as root; otherwise says
# what to install. Idempotent: a second run only prints the versions. Versions are whatever
# Debian bookworm serves (not pinnable beyond that); they are printed so the test log records them.
# The package scripts must not start the daemon themselves (run.sh starts dockerd with its own
# storage driver and log file), so a temporary policy-rc.d denies service starts during the install.
set -euo pipefail
pkgs=(docker.io debootstrap)
missing=()
command -v dockerd >/dev/null && [[ -x /usr/bin/docker ]] || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        echo "error: install Debian's ${missing[*]} (apt-get install ${missing[*]}) or run as root"
        exit 1
    fi
    echo "installing Debian's ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp)
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
    fi
    trap '[[ $made_policy == 1 ]] && rm -f "$policy"' EXIT
    apt-get install -y --no-install-recommends "${missing[@]}" >"$log" 2>&1 \
        || { apt-get update >>"$log" 2>&1 && apt-get install -y --no-install-recommends "${missing[@]}" >>"$log" 2>&1; } \
        || { cat "$log"; echo "error: apt-get install ${missing[*]} failed"; exit 1; }
fi
for p in "${pkgs[@]}" containerd runc iptables; do
    printf '  %-12s %s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo '(not a Debian package here)')"
done
