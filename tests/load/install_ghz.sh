#!/usr/bin/env bash
# Installs the pinned ghz into the project-local .tools/bin (nothing outside the repository is
# written except Go's own module and build caches). Does nothing when the right version is there.
#
#   tests/load/install_ghz.sh          # prints the path of the ghz binary on its last line
#
# Needs Go >= 1.23 (ghz v0.121.0's go.mod). `go version -m` is used for the version check because
# a `go install`ed ghz reports "dev" for --version.
set -euo pipefail

GHZ_VERSION=v0.121.0
GHZ_MODULE=github.com/bojand/ghz
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN_DIR=$ROOT/.tools/bin
GHZ=$BIN_DIR/ghz

installed_version() {
    # "	mod	github.com/bojand/ghz	v0.121.0	h1:..."
    go version -m "$GHZ" 2>/dev/null | awk -v m="$GHZ_MODULE" '$1 == "mod" && $2 == m { print $3 }'
}

if ! command -v go >/dev/null 2>&1; then
    echo "error: go not found: install Go 1.23 or newer (https://go.dev/dl/) to build ghz $GHZ_VERSION" >&2
    exit 1
fi

if [[ -x $GHZ && "$(installed_version)" == "$GHZ_VERSION" ]]; then
    echo "$GHZ"
    exit 0
fi

echo "installing ghz $GHZ_VERSION into $BIN_DIR (go install; a few minutes on a fresh machine)" >&2
mkdir -p "$BIN_DIR"
start=$(date +%s)
GOBIN=$BIN_DIR go install "$GHZ_MODULE/cmd/ghz@$GHZ_VERSION"
got=$(installed_version)
if [[ "$got" != "$GHZ_VERSION" ]]; then
    echo "error: $GHZ reports version '${got:-unknown}', expected $GHZ_VERSION" >&2
    exit 1
fi
echo "ghz $GHZ_VERSION installed in $(( $(date +%s) - start )) s" >&2
echo "$GHZ"
