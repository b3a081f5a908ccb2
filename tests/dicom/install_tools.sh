#!/usr/bin/env bash
# Debian's DICOM tools for the structured-report checks (tests/sr.rs): dciodvfy (dicom3tools)
# validates the SR against its IOD, dsrdump (dcmtk) reads it back. Installed with apt when
# missing and this runs as root; otherwise says what to install. Also used by `make dicom-data`
# (dcmtk's encoders).
set -euo pipefail
missing=()
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v dsrdump >/dev/null || missing+=(dcmtk)
[[ ${#missing[@]} == 0 ]] && exit 0
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing Debian's ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp)
    apt-get install -y --no-install-recommends "${missing[@]}" >"$log" 2>&1 \
        || { apt-get update >>"$log" 2>&1 && apt-get install -y --no-install-recommends "${missing[@]}" >>"$log" 2>&1; } \
        || { cat "$log"; echo "error: apt-get install ${missing[*]} failed"; exit 1; }
else
    echo "error: install Debian's ${missing[*]} (apt-get install ${missing[*]})"
    exit 1
fi
