#!/usr/bin/env bash
# There, on the lent GPU machine, from the repository root, in each call that carries one
# .whl/batch-NN folder made by `python -m cluster.gpu_kit fetch`.  It moves the carried parts into
# a stash that outlives the call (while the machine stays warm), and once every part listed in the
# MANIFEST is there it rebuilds the wheels and installs them with pip --no-index --no-deps --target.
# A second run after the install does nothing but print the exports.
#
#   bash cluster/gpu_kit/install-on-device.sh                  # stash; install when complete
#   bash cluster/gpu_kit/install-on-device.sh --need-complete  # same, but exit 10 if parts are missing
#   eval "$(bash cluster/gpu_kit/install-on-device.sh --need-complete | grep ^export)"
#
# Env: KIT_WHL_DIR (default .whl), KIT_STASH (default /var/tmp/device-kit-stash),
#      KIT_TARGET (default /tmp/site), PYTHON (default python3).
set -euo pipefail
WHL="${KIT_WHL_DIR:-.whl}"
STASH="${KIT_STASH:-/var/tmp/device-kit-stash}"
TARGET="${KIT_TARGET:-/tmp/site}"
PY="${PYTHON:-python3}"
NEED=0
[ "${1:-}" = "--need-complete" ] && NEED=1
t0=$(date +%s)
mkdir -p "$STASH/parts"

# 1. Move what this call carried into the stash (MANIFEST copied, parts checked later).
moved=0
for b in "$WHL"/batch-*/; do
    [ -d "$b" ] || continue
    for f in "$b"*; do
        [ -f "$f" ] || continue
        if [ "$(basename "$f")" = MANIFEST ]; then
            cp -f "$f" "$STASH/MANIFEST"
        else
            rm -f "$STASH/parts/$(basename "$f").ok"
            mv -f "$f" "$STASH/parts/"
            moved=$((moved + 1))
        fi
    done
done
[ -f "$STASH/MANIFEST" ] || { echo "device-kit: no MANIFEST in $WHL/batch-*/ nor in $STASH; carry a batch" >&2; exit 2; }
id=$(sha256sum "$STASH/MANIFEST" | cut -c1-16)
mode=$(awk '$1=="mode"{print $2}' "$STASH/MANIFEST")
nparts=$(awk '$1=="parts"{print $2}' "$STASH/MANIFEST")

if [ -f "$TARGET/.device-kit-installed" ] && [ "$(cat "$TARGET/.device-kit-installed")" = "$id" ]; then
    echo "device-kit: already installed in $TARGET (manifest $id)"
    echo "export PYTHONPATH=$TARGET\${PYTHONPATH:+:\$PYTHONPATH} PATH=$TARGET/bin:\$PATH"
    exit 0
fi

# 2. Which parts are present and intact?  (sha256 of a part is checked once, then remembered.)
have=0; missing=""
while read -r _ sum size name; do
    p="$STASH/parts/$name"
    if [ -f "$p" ] && [ "$(stat -c %s "$p")" = "$size" ]; then
        if [ "$(cat "$p.ok" 2>/dev/null)" != "$sum" ]; then
            if [ "$(sha256sum "$p" | cut -d' ' -f1)" = "$sum" ]; then echo "$sum" > "$p.ok"; else
                echo "device-kit: $name is corrupt; removed, carry its batch again" >&2; rm -f "$p"; missing="$missing $name"; continue
            fi
        fi
        have=$((have + 1))
    else
        missing="$missing $name"
    fi
done < <(awk '$1=="part"' "$STASH/MANIFEST")
echo "device-kit: moved $moved file(s) in this call; $have/$nparts parts in $STASH (mode $mode, manifest $id)"
echo "device-kit: stash disk: $(du -sh "$STASH" | cut -f1); free under it: $(df -h --output=avail "$STASH" | tail -1 | tr -d ' ')"
if [ "$have" != "$nparts" ]; then
    echo "device-kit: still missing $((nparts - have)) part(s):$(echo $missing | tr ' ' '\n' | head -4 | sed 's/^/ /' | tr -d '\n')$([ $((nparts - have)) -gt 4 ] && echo ' ...')"
    [ "$NEED" = 1 ] && exit 10
    exit 0
fi

# 3. Rebuild the wheels.
W="$STASH/wheels"
rm -rf "$W"; mkdir -p "$W"
if [ "$mode" = xz ]; then
    parts=$(awk '$1=="part"{print $4}' "$STASH/MANIFEST" | sort)
    if command -v xz >/dev/null 2>&1; then
        (cd "$STASH/parts" && cat $parts) | xz -dc | tar -x -C "$W"
    else
        (cd "$STASH/parts" && cat $parts) | "$PY" -c '
import lzma, sys, tarfile
with tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode="r|") as t:
    t.extractall(sys.argv[1])' "$W"
    fi
else
    for name in $(awk '$1=="part"{print $4}' "$STASH/MANIFEST" | sort); do
        case "$name" in
            *.whl) cp "$STASH/parts/$name" "$W/" ;;
            *.whl.part-*) cat "$STASH/parts/$name" >> "$W/${name%.part-*}" ;;
        esac
    done
fi
# Wheels as published (raw mode) must match their hashes; rewritten ones (xz mode) keep the
# same member files, so only their count is checked here.
nw=$(awk '$1=="wheel"' "$STASH/MANIFEST" | wc -l)
[ "$(ls "$W"/*.whl | wc -l)" = "$nw" ] || { echo "device-kit: expected $nw wheels after rebuild" >&2; exit 3; }
if [ "$mode" = raw ]; then
    while read -r _ sum _ name; do
        [ "$(sha256sum "$W/$name" | cut -d' ' -f1)" = "$sum" ] || { echo "device-kit: $name hash mismatch" >&2; exit 3; }
    done < <(awk '$1=="wheel"' "$STASH/MANIFEST")
fi
t1=$(date +%s)

# 4. Install (no index, no dependency resolution: the set is complete by construction).
rm -rf "$TARGET"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$TARGET" "$W"/*.whl
echo "$id" > "$TARGET/.device-kit-installed"
rm -rf "$W"
t2=$(date +%s)
echo "device-kit: rebuilt wheels in $((t1 - t0)) s, installed $nw wheels into $TARGET in $((t2 - t1)) s"
echo "export PYTHONPATH=$TARGET\${PYTHONPATH:+:\$PYTHONPATH} PATH=$TARGET/bin:\$PATH"
