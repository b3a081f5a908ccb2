#!/usr/bin/env bash
# Builds the CPU image and the model image from deploy/docker/Dockerfile on locally bootstrapped
# Debian bases, runs them the way deploy/k8s/base/deployment.yaml runs the pod, and classifies an
# image through the container from the host (`make image-test`; deploy/README.md, "Image test").
#
#   deploy/image-test/run.sh            # as serve.env: TLS on the gRPC and HTTP API ports (throwaway
#                                       # CA), a callers file with a throwaway token, audit trail
#   IMAGE_TEST_TLS=0 deploy/image-test/run.sh   # plaintext, no callers file, no audit trail (a
#                                       # binary without the security flags)
#   deploy/image-test/run.sh clean      # removes its images and .cache/image-test, and stops the
#                                       # dockerd it started (with that dockerd's build cache)
#
# Phases, one line each with its time (their output goes to .cache/image-test/logs/, printed on
# failure):
#   tools     Debian's docker.io and debootstrap (deploy/image-test/install.sh, apt, when missing)
#   dockerd   a reachable Docker engine, or dockerd started here in the background (overlay2, else
#             vfs; log .cache/image-test/dockerd.log); it is left running for the next run
#   bases     local stand-ins for the published base images, from one debootstrap (bookworm,
#             minbase) of the machine's Debian mirror, `docker import`ed; tarballs cached:
#               brainai-image-test/cc-debian12:nonroot   for gcr.io/distroless/cc-debian12:nonroot
#                                                        (distroless-style: package files only, no shell)
#               brainai-image-test/python:3.11-bookworm  for python:3.11-slim-bookworm
#               brainai-image-test/busybox:bookworm      for busybox:1.37.0 (Debian's busybox-static)
#   build     `docker build --target model` (pip install -r models/requirements.txt and
#             models/make_resnet50.py inside the build, as in production) and `--target cpu` with
#             BINARY_SOURCE=context (the host's release binary instead of the rust stage)
#   init      the Deployment's init container command (read from deployment.yaml) in the model
#             image: read-only root, uid 65532, no capabilities, the brainai-env variables
#             (serve.env), /config/model.toml; copies the model into a shared directory and checks
#             its SHA-256
#   serve     the CPU image: read-only root, uid 65532:65532, no capabilities, tmpfs /tmp, the
#             model directory read-only, serve.env, ports published on 127.0.0.1; with TLS, the
#             certificate and key at /etc/brainai/tls and callers.toml at /etc/brainai/auth, both
#             mounted read-only where deployment.yaml mounts the Secrets brainai-tls and
#             brainai-callers; ready when the metrics port's /readyz answers 200
#   classify  from the host: `brainai classify` over gRPC and POST /v1/classify over the HTTP API;
#             both must name the model and the SHA-256 the init step verified; with TLS, a
#             plaintext client, a client without the CA and a client without the token must be
#             refused, and standard output must hold the audit records (logs on standard error)
#   stop      SIGTERM (docker stop): the server drains and exits 0
# Containers and the shared directory are removed on exit; every wait is bounded; any failure
# exits non-zero. Needs root (dockerd, debootstrap), `make build` (or IMAGE_TEST_BINARY), python3,
# openssl and curl. The build reads a copy of the Dockerfile without its `# syntax=` line (dockerd's
# built-in frontend; that line would fetch docker/dockerfile:1.7 from Docker Hub).
#
# Settings (environment): IMAGE_TEST_TLS=1|0, IMAGE_TEST_BINARY (default target/release/brainai,
# copied into the cache first), IMAGE_TEST_MIRROR (default: the machine's apt mirror for bookworm),
# IMAGE_TEST_BUILD_NETWORK (default `default`, the bridge; `host` where the bridge has no route out),
# IMAGE_TEST_IMAGE (default tests/data/flair_256_a.png), DOCKER (default /usr/bin/docker, the engine's
# own client: it speaks BuildKit without the buildx plugin).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

CACHE=$ROOT/.cache/image-test
LOGS=$CACHE/logs
TLS=${IMAGE_TEST_TLS:-1}
BINARY_IN=${IMAGE_TEST_BINARY:-target/release/brainai}
IMAGE=${IMAGE_TEST_IMAGE:-tests/data/flair_256_a.png}
BUILD_NETWORK=${IMAGE_TEST_BUILD_NETWORK:-default}
DOCKER=${DOCKER:-/usr/bin/docker}
SUITE=bookworm
PREFIX=brainai-image-test
RUNTIME_BASE=$PREFIX/cc-debian12:nonroot
PYTHON_BASE=$PREFIX/python:3.11-bookworm
BUSYBOX_BASE=$PREFIX/busybox:bookworm
MODEL_IMAGE=$PREFIX/brainai-model-brain-tumor-resnet50:1
SERVE_IMAGE=$PREFIX/brainai-serve:cpu
MODEL_NAME=brain-tumor-resnet50
MODEL_VERSION=$(sed -n 's/^BRAINAI_MODEL_VERSION=//p' deploy/k8s/base/serve.env)
export DOCKER_BUILDKIT=1

if [[ ${1:-} == clean ]]; then
    ours=""
    if [[ -f $CACHE/dockerd.pid ]] && kill -0 "$(cat "$CACHE/dockerd.pid")" 2>/dev/null; then
        ours=$(cat "$CACHE/dockerd.pid")
    fi
    if timeout 20 "$DOCKER" info >/dev/null 2>&1; then
        imgs=$(timeout 20 "$DOCKER" images -q --filter "reference=$PREFIX/*" | sort -u)
        [[ -z $imgs ]] || timeout 120 "$DOCKER" rmi -f $imgs >/dev/null
        # the build cache is the engine's, not only ours: pruned only when this script started it
        [[ -z $ours ]] || timeout 300 "$DOCKER" builder prune -af >/dev/null
    fi
    if [[ -n $ours ]]; then
        kill "$ours"
        for _ in $(seq 1 60); do kill -0 "$ours" 2>/dev/null || break; sleep 0.5; done
        ! kill -0 "$ours" 2>/dev/null || { echo "error: dockerd $ours did not stop"; exit 1; }
    fi
    rm -rf "$CACHE"
    echo "image-test: removed $PREFIX/* images and $CACHE${ours:+, stopped dockerd $ours}"
    exit 0
fi
[[ $# == 0 ]] || { echo "usage: $0 [clean]"; exit 2; }

mkdir -p "$CACHE" "$LOGS"
rm -f "$LOGS"/*.log
RUN_DIR=""
CONTAINERS=()
PHASE=""
PHASE_N=0
T_ALL=$(date +%s.%N)

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# One line per phase on the terminal; the phase's own output goes to its log.
phase() {
    PHASE=$1
    PHASE_N=$((PHASE_N + 1))
    PHASE_LOG=$LOGS/$(printf '%02d' "$PHASE_N")-$1.log
    PHASE_T0=$(date +%s.%N)
    exec 3>&1 4>&2 >"$PHASE_LOG" 2>&1
}
done_phase() {
    exec 1>&3 2>&4 3>&- 4>&-
    printf '== %-9s ok   %6s s  %s\n' "$PHASE" "$(elapsed "$PHASE_T0")" "$*"
    PHASE=""
}
die() { echo "error: $*"; exit 1; }

cleanup() {
    local rc=$?
    if [[ -n $PHASE ]]; then
        exec 1>&3 2>&4
        printf '== %-9s FAIL %6s s  (last lines of %s)\n' "$PHASE" "$(elapsed "$PHASE_T0")" "${PHASE_LOG#"$ROOT"/}"
        tail -n 40 "$PHASE_LOG" | sed 's/^/   | /'
        [[ $rc == 0 ]] && rc=1
    fi
    if [[ $rc != 0 && ${#CONTAINERS[@]} -gt 0 ]]; then   # the container the failing step ran
        c=${CONTAINERS[-1]}
        if timeout 20 "$DOCKER" inspect "$c" >/dev/null 2>&1; then
            echo "   container $c (last log lines):"
            timeout 20 "$DOCKER" logs --tail 20 "$c" 2>&1 | sed 's/^/   | /'
        fi
    fi
    for c in "${CONTAINERS[@]}"; do
        timeout 60 "$DOCKER" rm -f "$c" >/dev/null 2>&1 || true
    done
    [[ -n $RUN_DIR ]] && rm -rf "$RUN_DIR"
    if [[ $rc == 0 ]]; then
        echo "image-test: ok ($(elapsed "$T_ALL") s)"
    else
        echo "image-test: FAILED ($(elapsed "$T_ALL") s)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ $(id -u) == 0 ]] || die "needs root (dockerd, debootstrap)"
[[ $TLS == 0 || $TLS == 1 ]] || die "IMAGE_TEST_TLS must be 0 or 1"
[[ -f $IMAGE ]] || die "$IMAGE missing"

# ---- tools --------------------------------------------------------------------------------------
phase tools
deploy/image-test/install.sh
echo "client: $("$DOCKER" --version)"
done_phase "$(dpkg-query -W -f='docker.io ${Version}' docker.io), $(dpkg-query -W -f='debootstrap ${Version}' debootstrap)"

# ---- dockerd ------------------------------------------------------------------------------------
phase dockerd
started=""
if timeout 20 "$DOCKER" info >/dev/null 2>&1; then
    note="engine already running"
else
    for driver in overlay2 vfs; do
        echo "starting dockerd --storage-driver=$driver (log $CACHE/dockerd.log)"
        setsid dockerd --storage-driver="$driver" --pidfile "$CACHE/dockerd.pid" \
            >>"$CACHE/dockerd.log" 2>&1 < /dev/null &
        pid=$!
        for _ in $(seq 1 60); do
            timeout 5 "$DOCKER" info >/dev/null 2>&1 && { started=$driver; break; }
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        [[ -n $started ]] && break
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        tail -n 5 "$CACHE/dockerd.log"
    done
    [[ -n $started ]] || die "dockerd did not start with overlay2 or vfs (see $CACHE/dockerd.log)"
    note="started dockerd (pid $(cat "$CACHE/dockerd.pid"), left running)"
fi
ver=$(timeout 20 "$DOCKER" version --format '{{.Server.Version}}')
drv=$(timeout 20 "$DOCKER" info --format '{{.Driver}}')
done_phase "engine $ver, storage driver $drv; $note"

# ---- bases --------------------------------------------------------------------------------------
phase bases
MIRROR=${IMAGE_TEST_MIRROR:-}
if [[ -z $MIRROR ]]; then
    # deb822 sources (URIs: + Suites:) first, then one-line sources
    MIRROR=$(awk '/^URIs:/ { u = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "'$SUITE'" && u ~ /\/debian\/?$/) { print u; exit } }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [[ -n $MIRROR ]] || MIRROR=$(awk '$1 == "deb" && $3 == "'$SUITE'" && $2 ~ /\/debian\/?$/ { print $2; exit }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    [[ -n $MIRROR ]] || MIRROR=http://deb.debian.org/debian
fi
echo "mirror: $MIRROR"
# Extra CAs the host trusts (/usr/local/share/ca-certificates, e.g. a TLS-intercepting egress
# proxy) go into the python base, so that pip inside the build trusts what the host's pip trusts.
EXTRA_CAS=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum | cut -c1-12)
mkdir -p "$CACHE/debs" "$CACHE/bases"
PATHENV='ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

# import_base TAG STAMP TARBALL CHANGE...: imports TARBALL as TAG unless TAG already carries STAMP
import_base() {
    local tag=$1 stamp=$2 tar=$3
    shift 3
    if [[ $(timeout 20 "$DOCKER" image inspect --format '{{index .Config.Labels "brainai.image-test.stamp"}}' "$tag" 2>/dev/null) == "$stamp" ]]; then
        echo "$tag: present ($stamp)"
        return
    fi
    local old changes=(--change "LABEL brainai.image-test.stamp=$stamp")
    old=$(timeout 20 "$DOCKER" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    for c in "$@"; do changes+=(--change "$c"); done
    timeout 300 "$DOCKER" import "${changes[@]}" "$tar" "$tag"
    echo "$tag: imported from ${tar#"$ROOT"/}"
    [[ -z $old ]] || timeout 60 "$DOCKER" rmi "$old" >/dev/null 2>&1 || true   # the replaced base
}
# The three bases come from one debootstrap (cached as three tarballs with one stamp):
#   python   bookworm minbase + python3, python3-venv, ca-certificates (+ the host's extra CAs)
#   runtime  distroless-style: only the files of the packages distroless cc-debian12 is made of
#            (dpkg-deb -x of base-files, tzdata, libc6, gcc-12-base, libgcc-s1, libstdc++6, libssl3
#            from the same download), Debian's CA bundle, passwd/group with nonroot 65532; no shell,
#            no package manager, so a RUN in the cpu stage would fail here as it does on distroless
#   busybox  busybox-static's /bin/busybox and its applet links
PY_INCLUDE=python3,python3-venv,ca-certificates,busybox-static
RUNTIME_DEBS=(base-files tzdata libc6 gcc-12-base libgcc-s1 libstdc++6 libssl3)
STAMP=$(printf '%s\n' "$SUITE" minbase "$MIRROR" "$PY_INCLUDE" "${RUNTIME_DEBS[*]}" "$EXTRA_CAS" v2 \
    | sha256sum | cut -c1-12)
B=$CACHE/bases
rm -f "$B"/*.tmp
for f in "$B"/*.tar; do   # tarballs of another recipe
    [[ ! -e $f || $f == *-$STAMP.tar ]] || { echo "removing stale $f"; rm -f "$f"; }
done
if [[ -f $B/python-$STAMP.tar && -f $B/runtime-$STAMP.tar && -f $B/busybox-$STAMP.tar ]]; then
    BASES_NOTE="cached tarballs"
else
    t0=$(date +%s.%N)
    dir=$B/python.rootfs
    rm -rf "$dir" "$B/runtime.rootfs" "$B/busybox.rootfs"
    echo "debootstrap --variant=minbase --include=$PY_INCLUDE $SUITE $MIRROR"
    timeout 900 debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$PY_INCLUDE" \
        "$SUITE" "$dir" "$MIRROR"
    t_debootstrap=$(elapsed "$t0")
    # runtime: files of the distroless packages, from the debs debootstrap just used
    rt=$B/runtime.rootfs
    mkdir -p "$rt"
    for pkg in "${RUNTIME_DEBS[@]}"; do
        ver=$(chroot "$dir" dpkg-query -W -f='${Version}' "$pkg")   # the version debootstrap installed
        debs=("$CACHE/debs/${pkg}_${ver//:/%3a}_"*.deb)
        [[ ${#debs[@]} == 1 && -f ${debs[0]} ]] || die "expected one $pkg $ver .deb in $CACHE/debs, found: ${debs[*]}"
        dpkg-deb -x "${debs[0]}" "$rt"
        echo "runtime: $(basename "${debs[0]}")"
    done
    rm -rf "$rt"/usr/share/doc/*/changelog* "$rt"/usr/share/man "$rt"/usr/share/info "$rt"/usr/share/lintian
    install -D -m 0644 "$dir/etc/ssl/certs/ca-certificates.crt" "$rt/etc/ssl/certs/ca-certificates.crt"
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' > "$rt/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' 'nonroot:x:65532:' > "$rt/etc/group"
    mkdir -p "$rt/tmp" "$rt/root" "$rt/home/nonroot"
    chmod 1777 "$rt/tmp"
    chmod 700 "$rt/root"
    chown 65532:65532 "$rt/home/nonroot"
    [[ ! -e $rt/bin/sh && ! -e $rt/usr/bin/apt ]] || die "runtime base has a shell or apt"
    # busybox
    bb=$B/busybox.rootfs
    mkdir -p "$bb/bin" "$bb/etc" "$bb/tmp" "$bb/root"
    chmod 1777 "$bb/tmp"
    cp "$dir/bin/busybox" "$bb/bin/busybox"
    for applet in $("$bb/bin/busybox" --list); do
        [[ -e $bb/bin/$applet ]] || ln -s busybox "$bb/bin/$applet"
    done
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/home:/bin/false' > "$bb/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' > "$bb/etc/group"
    # python: plus the host's extra CAs
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/"
        chroot "$dir" update-ca-certificates
    fi
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/var/log/*.log
    : > "$dir/etc/resolv.conf"
    for name in python runtime busybox; do
        tar --numeric-owner -C "$B/$name.rootfs" -cf "$B/$name-$STAMP.tar.tmp" .
    done
    for name in python runtime busybox; do
        mv "$B/$name-$STAMP.tar.tmp" "$B/$name-$STAMP.tar"
        rm -rf "$B/$name.rootfs"
    done
    BASES_NOTE="debootstrap $t_debootstrap s, all three $(elapsed "$t0") s"
fi
import_base "$RUNTIME_BASE" "$STAMP" "$B/runtime-$STAMP.tar" "$PATHENV" \
    'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' 'WORKDIR /home/nonroot' 'USER 65532:65532'
import_base "$BUSYBOX_BASE" "$STAMP" "$B/busybox-$STAMP.tar" "$PATHENV" 'CMD ["sh"]'
import_base "$PYTHON_BASE" "$STAMP" "$B/python-$STAMP.tar" "$PATHENV" 'ENV LANG=C.UTF-8' 'CMD ["python3"]'
pyver=$(timeout 60 "$DOCKER" run --rm "$PYTHON_BASE" python3 --version)
bbver=$(timeout 60 "$DOCKER" run --rm "$BUSYBOX_BASE" busybox 2>&1 | sed -n '1p' | cut -d' ' -f1-2)
done_phase "$BASES_NOTE; bookworm from $MIRROR; $pyver; $bbver; runtime: no shell"

# ---- build --------------------------------------------------------------------------------------
phase build
# The binary: a copy in the cache (the build context sees it through Dockerfile.dockerignore; a
# cargo build writing target/ meanwhile cannot change what is built).
BINARY=$CACHE/brainai
if [[ $(realpath "$BINARY_IN") != $(realpath -m "$BINARY") ]]; then
    [[ -x $BINARY_IN ]] || die "$BINARY_IN missing: run make build (or set IMAGE_TEST_BINARY)"
    install -m 0755 "$BINARY_IN" "$BINARY.tmp" && mv "$BINARY.tmp" "$BINARY"
fi
[[ -x $BINARY ]] || die "$BINARY missing"
echo "binary: $(sha256sum "$BINARY")"
# dockerd's built-in Dockerfile frontend: the `# syntax=docker/dockerfile:1.7` line would pull the
# frontend image from Docker Hub, so the build reads a copy without that one line (checked).
DF_DIR=$CACHE/dockerfile
mkdir -p "$DF_DIR"
grep -v '^# syntax=' deploy/docker/Dockerfile > "$DF_DIR/Dockerfile"
cp deploy/docker/Dockerfile.dockerignore "$DF_DIR/Dockerfile.dockerignore"
diff deploy/docker/Dockerfile "$DF_DIR/Dockerfile" > "$DF_DIR/diff" || true
removed=$(grep -c '^<' "$DF_DIR/diff" || true)
added=$(grep -c '^>' "$DF_DIR/diff" || true)
[[ $removed -le 1 && $added == 0 ]] || die "the build's copy of the Dockerfile differs by more than the syntax line"
common=(--network "$BUILD_NETWORK" -f "$DF_DIR/Dockerfile"
        --build-arg "PYTHON_IMAGE=$PYTHON_BASE" --build-arg "MODEL_VERSION=$MODEL_VERSION")
t0=$(date +%s.%N)
timeout 1800 "$DOCKER" build --progress=plain "${common[@]}" --target model \
    --build-arg "MODEL_RUNTIME_IMAGE=$BUSYBOX_BASE" -t "$MODEL_IMAGE" .
t_model=$(elapsed "$t0")
t0=$(date +%s.%N)
timeout 1800 "$DOCKER" build --progress=plain "${common[@]}" --target cpu \
    --build-arg "CPU_RUNTIME_IMAGE=$RUNTIME_BASE" \
    --build-arg BINARY_SOURCE=context --build-arg "BINARY=${BINARY#"$ROOT"/}" -t "$SERVE_IMAGE" .
t_cpu=$(elapsed "$t0")
user_cpu=$(timeout 20 "$DOCKER" image inspect --format '{{.Config.User}}' "$SERVE_IMAGE")
user_model=$(timeout 20 "$DOCKER" image inspect --format '{{.Config.User}}' "$MODEL_IMAGE")
[[ $user_cpu == 65532:65532 && $user_model == 65532:65532 ]] || die "image users: cpu $user_cpu, model $user_model"
# images this test built or imported before and has since replaced (they carry the bases' label)
timeout 120 "$DOCKER" image prune -f --filter label=brainai.image-test.stamp
size() { timeout 20 "$DOCKER" image inspect --format '{{.Size}}' "$1" | awk '{ printf "%d MB", $1 / 1e6 }'; }
done_phase "model image $t_model s ($(size "$MODEL_IMAGE")), cpu image $t_cpu s ($(size "$SERVE_IMAGE")), network $BUILD_NETWORK"

# ---- init ---------------------------------------------------------------------------------------
phase init
RUN_DIR=$(mktemp -d "$CACHE/run.XXXXXX")
chmod 755 "$RUN_DIR"
# The pod's `models` emptyDir: writable by the pod's fsGroup 65532.
mkdir -p "$RUN_DIR/models" "$RUN_DIR/config" "$RUN_DIR/tls" "$RUN_DIR/auth"
chown 65532:65532 "$RUN_DIR/models"
cp deploy/k8s/base/model.toml "$RUN_DIR/config/model.toml"   # the brainai-model-config ConfigMap
chmod -R a+rX "$RUN_DIR/config"
mapfile -d '' -t INIT_CMD < <(python3 deploy/image-test/init_command.py deploy/k8s/base/deployment.yaml)
[[ ${#INIT_CMD[@]} -ge 1 ]] || die "no init container command in deployment.yaml"
printf 'init command (deployment.yaml):'; printf ' %q' "${INIT_CMD[@]}"; echo
# The SHA-256 the model image carries (written by its build): what the init step verifies against.
want_sha=$(timeout 60 "$DOCKER" run --rm --read-only --user 65532:65532 --network none --entrypoint /bin/cat \
    "$MODEL_IMAGE" "/model/$MODEL_NAME/$MODEL_VERSION/model.onnx.sha256" | awk '{ print $1 }')
[[ $want_sha =~ ^[0-9a-f]{64}$ ]] || die "model image has no valid model.onnx.sha256 ($want_sha)"
# run_init NAME MODELS_DIR [docker run options]: the pod's init container (NAME registered for
# removal by the caller: this may run in a pipeline's subshell)
run_init() {
    local name=$1 models=$2
    shift 2
    timeout 300 "$DOCKER" run --name "$name" --read-only --user 65532:65532 \
        --cap-drop ALL --security-opt no-new-privileges --network none \
        --env-file deploy/k8s/base/serve.env \
        -v "$models:/models" -v "$RUN_DIR/config:/config:ro" "$@" \
        --entrypoint "${INIT_CMD[0]}" "$MODEL_IMAGE" "${INIT_CMD[@]:1}"
}
# First a model image whose model.onnx.sha256 does not match: the init command must refuse it.
mkdir -p "$RUN_DIR/bad-models"
chown 65532:65532 "$RUN_DIR/bad-models"
printf '%064d  model.onnx\n' 0 > "$RUN_DIR/bad.sha256"
chmod 444 "$RUN_DIR/bad.sha256"
CONTAINERS+=("$PREFIX-init-bad-$$")
if run_init "$PREFIX-init-bad-$$" "$RUN_DIR/bad-models" \
    -v "$RUN_DIR/bad.sha256:/model/$MODEL_NAME/$MODEL_VERSION/model.onnx.sha256:ro"; then
    die "the init command accepted a model.onnx.sha256 that does not match"
fi
rm -rf "$RUN_DIR/bad-models"
INIT=$PREFIX-init-$$
CONTAINERS+=("$INIT")
run_init "$INIT" "$RUN_DIR/models" | tee "$RUN_DIR/init.log"
rc=$(timeout 20 "$DOCKER" inspect --format '{{.State.ExitCode}}' "$INIT")
[[ $rc == 0 ]] || die "init step exited $rc"
grep -q '^model.onnx: OK$' "$RUN_DIR/init.log" || die "init step did not print sha256sum's 'model.onnx: OK'"
got_sha=$(sha256sum "$RUN_DIR/models/$MODEL_NAME/$MODEL_VERSION/model.onnx" | awk '{ print $1 }')
[[ $got_sha == "$want_sha" ]] || die "copied model.onnx is $got_sha, the image says $want_sha"
[[ -f $RUN_DIR/models/$MODEL_NAME/model.toml ]] || die "init step wrote no model.toml"
note=""
if [[ -f models/$MODEL_NAME/$MODEL_VERSION/model.onnx ]]; then
    host_sha=$(sha256sum "models/$MODEL_NAME/$MODEL_VERSION/model.onnx" | awk '{ print $1 }')
    [[ $host_sha == "$want_sha" ]] && note="; = make model's" || note="; differs from make model's ${host_sha:0:12}"
fi
done_phase "model.onnx sha256 ${want_sha:0:12} verified by the init command and copied$note; a wrong .sha256 is refused"

# ---- serve --------------------------------------------------------------------------------------
phase serve
SCHEME=http
SERVE_ARGS=(serve)
CLIENT_TLS=()
CURL_TLS=()
CURL_AUTH=()
# The pod's environment (the brainai-env ConfigMap). With TLS=0 without the security settings:
# they name files only the TLS run provides (and a binary without those flags ignores them anyway).
ENV_FILE=$RUN_DIR/serve.env
if [[ $TLS == 1 ]]; then
    cp deploy/k8s/base/serve.env "$ENV_FILE"
else
    grep -Ev '^BRAINAI_(TLS_[A-Z_]*|AUTH_[A-Z_]*|AUDIT_[A-Z_]*|HEALTH_ADDR)=' deploy/k8s/base/serve.env > "$ENV_FILE"
fi
# Where deployment.yaml mounts the Secrets, as serve.env names the files.
env_path() { sed -n "s/^$1=//p" deploy/k8s/base/serve.env; }
TLS_CERT_PATH=$(env_path BRAINAI_TLS_CERT)
TLS_KEY_PATH=$(env_path BRAINAI_TLS_KEY)
CALLERS_PATH=$(env_path BRAINAI_AUTH_CALLERS)
TLS_DIR=${TLS_CERT_PATH%/*}
AUTH_DIR=${CALLERS_PATH%/*}
[[ $TLS == 0 || ( $TLS_DIR == /etc/brainai/tls && ${TLS_KEY_PATH%/*} == "$TLS_DIR" && -n $AUTH_DIR ) ]] \
    || die "serve.env: TLS files $TLS_CERT_PATH $TLS_KEY_PATH and callers file $CALLERS_PATH not where deployment.yaml mounts them"
if [[ $TLS == 1 ]]; then
    # Throwaway CA and server certificate (SAN localhost, 127.0.0.1), mounted read-only.
    t=$RUN_DIR/tls
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=brainai image-test CA" -keyout "$t/ca.key" -out "$t/ca.crt" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
        -keyout "$t/tls.key" -out "$t/tls.csr"
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' > "$t/ext"
    openssl x509 -req -in "$t/tls.csr" -CA "$t/ca.crt" -CAkey "$t/ca.key" -CAcreateserial -days 2 \
        -extfile "$t/ext" -out "$t/tls.crt"
    rm -f "$t/ca.key" "$t/tls.csr" "$t/ext" "$t"/*.srl
    # As the Secret volumes: owner root, group 65532 (the pod's fsGroup), mode 0440.
    chown 0:65532 "$t/tls.key" "$t/tls.crt" "$t/ca.crt"
    chmod 0440 "$t/tls.key" "$t/tls.crt" "$t/ca.crt"
    # callers.toml (the brainai-callers Secret) with a throwaway token for the host's client.
    export BRAINAI_TOKEN
    BRAINAI_TOKEN=$(openssl rand -hex 32)
    printf '[[caller]]\nname = "image-test"\ntoken = "%s"\nscopes = ["infer", "read"]\n' "$BRAINAI_TOKEN" \
        > "$RUN_DIR/auth/${CALLERS_PATH##*/}"
    chown 0:65532 "$RUN_DIR/auth/${CALLERS_PATH##*/}"
    chmod 0440 "$RUN_DIR/auth/${CALLERS_PATH##*/}"
    SCHEME=https
    # serve.env sets BRAINAI_TLS_CERT/KEY, BRAINAI_AUTH_CALLERS, BRAINAI_AUDIT_LOG=- and
    # BRAINAI_HEALTH_ADDR, as in the pod: no extra arguments.
    CLIENT_TLS=(--ca "$t/ca.crt")
    CURL_TLS=(--cacert "$t/ca.crt")
    CURL_AUTH=(-H "authorization: Bearer $BRAINAI_TOKEN")
fi
MOUNTS=(-v "$RUN_DIR/models:/models:ro")
[[ $TLS == 0 ]] || MOUNTS+=(-v "$RUN_DIR/tls:$TLS_DIR:ro" -v "$RUN_DIR/auth:$AUTH_DIR:ro")
SERVE=$PREFIX-serve-$$
CONTAINERS+=("$SERVE")
timeout 120 "$DOCKER" run -d --name "$SERVE" --read-only --user 65532:65532 \
    --cap-drop ALL --security-opt no-new-privileges \
    --tmpfs /tmp:rw,nosuid,nodev,noexec,size=256m,mode=1777 \
    --env-file "$ENV_FILE" "${MOUNTS[@]}" \
    -p 127.0.0.1::50051 -p 127.0.0.1::8000 -p 127.0.0.1::9090 \
    "$SERVE_IMAGE" "${SERVE_ARGS[@]}"
port() { timeout 20 "$DOCKER" port "$SERVE" "$1/tcp" | sed -n '1s/.*://p'; }
sleep 0.5
[[ $(timeout 20 "$DOCKER" inspect --format '{{.State.Running}}' "$SERVE") == true ]] || die "server container exited at once"
GRPC_PORT=$(port 50051)
HTTP_PORT=$(port 8000)
METRICS_PORT=$(port 9090)
echo "ports: grpc $GRPC_PORT, http $HTTP_PORT, metrics $METRICS_PORT"
[[ -n $GRPC_PORT && -n $HTTP_PORT && -n $METRICS_PORT ]] || die "ports not published"
ready=0
for _ in $(seq 1 180); do   # the startup probe's 180 s
    if [[ $(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$METRICS_PORT/readyz") == 200 ]]; then
        ready=1
        break
    fi
    [[ $(timeout 20 "$DOCKER" inspect --format '{{.State.Running}}' "$SERVE") == true ]] \
        || { timeout 20 "$DOCKER" logs "$SERVE" 2>&1 | tail -n 30; die "server container exited during start-up"; }
    sleep 1
done
[[ $ready == 1 ]] || { timeout 20 "$DOCKER" logs "$SERVE" 2>&1 | tail -n 30; die "/readyz not 200 within 180 s"; }
# What the pod's securityContext asks for, read from the running container.
pid=$(timeout 20 "$DOCKER" inspect --format '{{.State.Pid}}' "$SERVE")
uid=$(awk '/^Uid:/ { print $2 "/" $3 }' "/proc/$pid/status")
gid=$(awk '/^Gid:/ { print $2 "/" $3 }' "/proc/$pid/status")
capeff=$(awk '/^CapEff:/ { print $2 }' "/proc/$pid/status")
ro=$(timeout 20 "$DOCKER" inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$SERVE")
[[ $uid == 65532/65532 && $gid == 65532/65532 ]] || die "server runs as uid $uid gid $gid"
[[ $capeff == 0000000000000000 ]] || die "server has capabilities $capeff"
[[ $ro == true ]] || die "root filesystem not read-only"
timeout 20 "$DOCKER" logs "$SERVE" 2>&1 | tail -n 20
done_phase "ready (/readyz 200) as uid 65532, read-only root, no capabilities; TLS $([[ $TLS == 1 ]] && echo on || echo off) on gRPC :$GRPC_PORT and HTTP :$HTTP_PORT"

# ---- classify -----------------------------------------------------------------------------------
phase classify
timeout 90 "$BINARY" classify --server "$SCHEME://127.0.0.1:$GRPC_PORT" "${CLIENT_TLS[@]}" --json "$IMAGE" \
    > "$RUN_DIR/classify.json"
cat "$RUN_DIR/classify.json"
timeout 90 curl -sS --fail-with-body "${CURL_TLS[@]}" "${CURL_AUTH[@]}" -H 'Content-Type: image/png' --data-binary "@$IMAGE" \
    "$SCHEME://127.0.0.1:$HTTP_PORT/v1/classify" > "$RUN_DIR/http.json"
cat "$RUN_DIR/http.json"; echo
summary=$(python3 - "$RUN_DIR/classify.json" "$RUN_DIR/http.json" "$MODEL_NAME" "$want_sha" <<'PY'
import json, sys
grpc, http, name, sha = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3], sys.argv[4]

def models(o):
    """every {name, sha256} object naming a model anywhere in the answer"""
    if isinstance(o, dict):
        if "sha256" in o and isinstance(o.get("sha256"), str):
            yield o
        for v in o.values():
            yield from models(v)
    elif isinstance(o, list):
        for v in o:
            yield from models(v)

def labels(o):
    if isinstance(o, dict):
        if isinstance(o.get("label"), str):
            yield o["label"]
        for v in o.values():
            yield from labels(v)
    elif isinstance(o, list):
        for v in o:
            yield from labels(v)

out = []
for what, ans in (("gRPC", grpc), ("HTTP", http)):
    ms = list(models(ans))
    assert ms, f"{what}: the answer names no model: {ans}"
    for m in ms:
        assert m.get("name") == name, f"{what}: model {m.get('name')}, expected {name}"
        assert m["sha256"] == sha, f"{what}: model sha256 {m['sha256']}, the init step verified {sha}"
    ls = list(labels(ans))
    assert ls, f"{what}: no label in the answer: {ans}"
    out.append(f"{what} {ls[0]}")
print(", ".join(out))
PY
)
note=""
if [[ $TLS == 1 ]]; then
    # TLS really is on: a plaintext client must not get an answer from either port.
    if timeout 30 "$BINARY" classify --server "http://127.0.0.1:$GRPC_PORT" --timeout-s 10 "$IMAGE"; then
        die "a plaintext gRPC client got an answer from the TLS port"
    fi
    code=$(curl -s -o /dev/null -m 10 -w '%{http_code}' "http://127.0.0.1:$HTTP_PORT/v2/health/ready" || true)
    [[ $code != 200 ]] || die "plaintext HTTP got 200 from the TLS port"
    # and a client that does not trust the CA is refused
    if curl -s -o /dev/null -m 10 "https://127.0.0.1:$HTTP_PORT/v2/health/ready"; then
        die "curl without the CA accepted the server's certificate"
    fi
    # the callers file is in force: no token, no answer (health stays open)
    if env -u BRAINAI_TOKEN timeout 30 "$BINARY" classify --server "https://127.0.0.1:$GRPC_PORT" "${CLIENT_TLS[@]}" \
        --timeout-s 10 "$IMAGE"; then
        die "a gRPC client without a token got an answer"
    fi
    code=$(curl -s -o /dev/null -m 10 -w '%{http_code}' "${CURL_TLS[@]}" -H 'Content-Type: image/png' \
        --data-binary "@$IMAGE" "https://127.0.0.1:$HTTP_PORT/v1/classify" || true)
    [[ $code == 401 ]] || die "POST /v1/classify without a token: HTTP $code, expected 401"
    code=$(curl -s -o /dev/null -m 10 -w '%{http_code}' "${CURL_TLS[@]}" "https://127.0.0.1:$HTTP_PORT/v2/health/ready" || true)
    [[ $code == 200 ]] || die "/v2/health/ready without a token: HTTP $code, expected 200 (health needs no credential)"
    # the audit trail (BRAINAI_AUDIT_LOG=-) on standard output, the server's logs on standard error
    timeout 20 "$DOCKER" logs "$SERVE" 2>/dev/null > "$RUN_DIR/audit.jsonl"
    audit=$(python3 - "$RUN_DIR/audit.jsonl" "$BRAINAI_TOKEN" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
assert sys.argv[2] not in text, "the token appears on standard output"
records = [json.loads(line) for line in text.splitlines() if line.strip()]
assert records, "no audit record on standard output"
for r in records:
    assert {"caller", "method", "outcome"} <= set(r) and "level" not in r, f"not an audit record (a log line on stdout?): {r}"
ok = [r for r in records if r["caller"] == "image-test"]
refused = [r for r in records if r["caller"] == "anonymous" and r["outcome"] in ("UNAUTHENTICATED", "401")]
assert len(ok) >= 2 and refused, f"expected the two classifications by image-test and the refused calls: {records}"
print(f"{len(records)} audit records on stdout ({len(ok)} by image-test, {len(refused)} refused)")
PY
) || die "audit trail: $audit"
    note="; plaintext, untrusted and token-less clients refused; $audit"
fi
done_phase "$summary; model $MODEL_NAME sha256 ${want_sha:0:12} = the init step's$note"

# ---- stop ---------------------------------------------------------------------------------------
phase stop
timeout 60 "$DOCKER" stop -t 45 "$SERVE"   # terminationGracePeriodSeconds
rc=$(timeout 20 "$DOCKER" inspect --format '{{.State.ExitCode}}' "$SERVE")
timeout 20 "$DOCKER" logs "$SERVE" > "$RUN_DIR/serve.log" 2>&1
tail -n 5 "$RUN_DIR/serve.log"
[[ $rc == 0 ]] || die "server exited $rc after SIGTERM"
grep -q '"drained; stopping"' "$RUN_DIR/serve.log" || die "no drain in the server's log"
done_phase "SIGTERM: drained, exit status 0"
