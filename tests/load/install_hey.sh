#!/usr/bin/env bash
# Installs the pinned hey (HTTP load generator) into the project-local .tools/bin, as
# install_ghz.sh does for ghz. Does nothing when the right version is there.
#
#   tests/load/install_hey.sh          # prints the path of the hey binary on its last line
set -euo pipefail

HEY_VERSION=v0.1.4
HEY_MODULE=github.com/rakyll/hey
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN_DIR=$ROOT/.tools/bin
HEY=$BIN_DIR/hey

installed_version() {
    go version -m "$HEY" 2>/dev/null | awk -v m="$HEY_MODULE" '$1 == "mod" && $2 == m { print $3 }'
}

command -v go >/dev/null 2>&1 || { echo "error: go not found: install Go 1.23 or newer to build hey $HEY_VERSION" >&2; exit 1; }
if [[ -x $HEY && "$(installed_version)" == "$HEY_VERSION" ]]; then
    echo "$HEY"
    exit 0
fi
echo "installing hey $HEY_VERSION into $BIN_DIR (go install)" >&2
mkdir -p "$BIN_DIR"
GOBIN=$BIN_DIR GOFLAGS= go install "$HEY_MODULE@$HEY_VERSION"
got=$(installed_version)
[[ "$got" == "$HEY_VERSION" ]] || { echo "error: $HEY reports version '${got:-unknown}', expected $HEY_VERSION" >&2; exit 1; }
echo "$HEY"
