#!/usr/bin/env bash
# Packs what benches/gpu_check.sh needs for a lent GPU machine that can reach nothing and takes at
# most 64 MiB per call (working tree included), in two parts:
#
#   .gpua/cudapart.00   first part of the CUDA provider library (xz)
#   .gpub/              the rest of it, the stripped release `brainai` and `serving` bench
#                       binaries, ghz, libonnxruntime.so and its providers_shared library (xz),
#                       and run.sh, which unpacks everything into .gpuc/ and runs gpu_check.sh.
#
# The onnxruntime-gpu wheel's libonnxruntime_providers_cuda.so is 284 MB, 186 MB compressed: here
# the GPU code for every architecture but $SM (default 90: H100/H200) is zeroed, which compresses
# away (52 MB). That copy is for the test rig only; images install the unmodified wheel.
#
# Then, with the device tool (the machine stays warm 30 s between calls, and .gpuc/ survives):
#   run  carry=[".gpua"]  "mkdir -p .gpuc && cp .gpua/cudapart.00 .gpuc/"
#   run  carry=[".gpub"]  "bash .gpub/run.sh"        (at once after the first call)
# Needs: cargo, python3 -m pip, xz, strip; `make ghz` (tests/load/install_ghz.sh) for ghz.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_GPU=${ORT_GPU:-1.31.1}
SM=${SM:-90}
W=${W:-/tmp/brainai-gpu-bundle}
mkdir -p "$W" .git/info
for d in /.gpua/ /.gpub/ /.gpuc/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .gpua .gpub && mkdir -p .gpua .gpub

[ -f "$W/onnxruntime/capi/libonnxruntime.so.$ORT_GPU" ] || {
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$W" "onnxruntime-gpu==$ORT_GPU"
  (cd "$W" && unzip -o -q onnxruntime_gpu-"$ORT_GPU"-*.whl 'onnxruntime/capi/*.so*')
}
cp "$W/onnxruntime/capi/libonnxruntime_providers_cuda.so" "$W/pruned.so"
python3 - "$W/pruned.so" "$SM" <<'PY'
# Fatbin containers (magic 0xBA55ED50, 16-byte header, then entries: kind u16 (2 = SASS),
# version u16, header size u32, padded payload size u64, ..., sm version u32 at offset 28).
import mmap, struct, sys
keep = int(sys.argv[2])
with open(sys.argv[1], "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)
    magic, pos, zeroed, kept = struct.pack("<I", 0xBA55ED50), 0, 0, 0
    pos = m.find(magic)
    while pos != -1:
        _, header, size = struct.unpack_from("<HHQ", m, pos + 4)
        if header != 16:
            pos = m.find(magic, pos + 4)
            continue
        entry, end = pos + header, pos + header + size
        while entry < end:
            kind, _, entry_header, padded = struct.unpack_from("<HHIQ", m, entry)
            sm = struct.unpack_from("<I", m, entry + 28)[0]
            if kind == 2 and sm != keep:
                m[entry + entry_header:entry + entry_header + padded] = bytes(padded)
                zeroed += padded
            elif sm == keep:
                kept += padded
            entry += entry_header + padded
        pos = m.find(magic, end)
    m.flush()
    if kept == 0:
        sys.exit(f"no sm_{keep} code in the provider: nothing would run")
    print(f"zeroed {zeroed / 1e6:.0f} MB of GPU code for other architectures, kept {kept / 1e6:.0f} MB of sm_{keep}")
PY
xz -T0 -6 -c "$W/pruned.so" > "$W/cuda.so.xz"
split -b 42000000 -d "$W/cuda.so.xz" "$W/cudapart."
mv "$W/cudapart.00" .gpua/ && mv "$W/cudapart.01" .gpub/

cargo build --release --locked
cargo bench --locked --no-run --bench serving
bench=$(ls -t target/release/deps/serving-* | grep -v '\.d$' | head -1)
ghz=${GHZ:-$(tests/load/install_ghz.sh | tail -n 1)}
cp target/release/brainai "$W/brainai" && cp "$bench" "$W/serving" && cp "$ghz" "$W/ghz"
strip "$W/brainai" "$W/serving" "$W/ghz"
for f in brainai serving ghz; do xz -T0 -6 -c "$W/$f" > ".gpub/$f.xz"; done
xz -T0 -6 -c "$W/onnxruntime/capi/libonnxruntime.so.$ORT_GPU" > ".gpub/libonnxruntime.so.$ORT_GPU.xz"
cp "$W/onnxruntime/capi/libonnxruntime_providers_shared.so" .gpub/
cat > .gpub/run.sh <<EOF
#!/usr/bin/env bash
# Unpacks the bundle into .gpuc/ (the first call left cudapart.00 there) and runs gpu_check.sh.
set -u
export PYTHONUNBUFFERED=1
G=\$PWD/.gpuc; mkdir -p "\$G/lib"
if [ ! -s "\$G/lib/libonnxruntime_providers_cuda.so" ]; then
  [ -s "\$G/cudapart.00" ] || { echo "the first call's part of the provider library is gone"; exit 3; }
  cat "\$G/cudapart.00" .gpub/cudapart.01 | xz -T0 -d > "\$G/lib/libonnxruntime_providers_cuda.so" || exit 3
fi
for f in brainai serving ghz; do xz -dc ".gpub/\$f.xz" > "\$G/\$f"; chmod +x "\$G/\$f"; done
xz -dc .gpub/libonnxruntime.so.$ORT_GPU.xz > "\$G/lib/libonnxruntime.so.$ORT_GPU"
cp .gpub/libonnxruntime_providers_shared.so "\$G/lib/"
mkdir -p /tmp/gout
MEMORY_BATCHES="\${MEMORY_BATCHES-}" BENCH_INSTANCES="\${BENCH_INSTANCES-}" G=\$G OUT=/tmp/gout \\
  timeout "\${LIMIT:-520}" bash benches/gpu_check.sh 2>&1 | tee "\$OUT/log.txt"
rc=\${PIPESTATUS[0]}
(cd /tmp/gout && tar czf "\$OUT/gout.tgz" --exclude='*.json' .)
echo "gpu_check rc=\$rc"
EOF
chmod +x .gpub/run.sh
du -b .gpua .gpub
