#!/usr/bin/env bash
# Fetches the optical-recognition-of-handwritten-digits data set (E. Alpaydin and C. Kaynak,
# UCI Machine Learning Repository, 1998: 1797 8×8 images with pixels 0..16 and their digit) as
# scikit-learn ships it, into Kiln's cache, and prints the folder. Idempotent: a complete,
# verified cache is left alone (no network).
#
# Source: the PyPI wheel `scikit-learn==1.9.1` (x86-64, CPython 3.11), which holds the data as
# `sklearn/datasets/data/digits.csv.gz` and its description with the attribution as
# `sklearn/datasets/descr/digits.rst`. The only network access is `pip download` of that one
# wheel; its sha256 (below, the one PyPI publishes) is checked before anything is unpacked.
#
# Result, in ${KILN_CACHE:-$HOME/.cache/kiln}/digits/:
#   digits.csv   1797 rows of 65 integers: 64 pixels, then the digit
#   digits.rst   the data set's description and attribution, as scikit-learn ships it
#   digits.safetensors  the same for `kiln train --data`: `image` f32 [1797, 64] (pixels / 16,
#                so in [0, 1]) and `label` i64 [1797]; written from digits.csv (Python's
#                standard library only) when missing
#
# Usage: scripts/fetch_digits.sh            (KILN_CACHE=/some/dir to use another cache)
set -euo pipefail

PACKAGE="scikit-learn"
VERSION="1.9.1"
WHEEL="scikit_learn-${VERSION}-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
WHEEL_SHA256="52a0703bbc07ad27f560fa63fa68e4c54dd735bfbbf65b4dd3c225dc7547b6df"
# sha256 of the unpacked, decompressed CSV, so a damaged or replaced cache is noticed.
CSV_SHA256="6ebb3d2fee246a4e99363262ddf8a00a3c41bee6014c373ed9d9216ba7f651b8"

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}/digits"
STAMP="$CACHE/.complete"

die() {
    echo "fetch_digits: error: $*" >&2
    exit 1
}

sha256() {
    sha256sum "$1" | cut -d' ' -f1
}

# digits.csv → digits.safetensors (the header, then the f32 images and the i64 labels, all
# little-endian), through a temporary file and a rename.
write_safetensors() {
    local out="$CACHE/digits.safetensors"
    [[ -s "$out" ]] && return 0
    command -v python3 >/dev/null || die "python3 is needed to write digits.safetensors"
    python3 - "$CACHE/digits.csv" "$out.tmp" <<'PY' || die "cannot write $out"
import json, struct, sys
rows = [[int(v) for v in line.split(",")] for line in open(sys.argv[1]) if line.strip()]
assert all(len(r) == 65 for r in rows), "64 pixels and a digit per row"
n = len(rows)
image = struct.pack("<%df" % (64 * n), *[v / 16.0 for r in rows for v in r[:64]])
label = struct.pack("<%dq" % n, *[r[64] for r in rows])
header = json.dumps({
    "image": {"dtype": "F32", "shape": [n, 64], "data_offsets": [0, len(image)]},
    "label": {"dtype": "I64", "shape": [n], "data_offsets": [len(image), len(image) + len(label)]},
}, separators=(",", ":")).encode()
header += b" " * (-len(header) % 8)
with open(sys.argv[2], "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + image + label)
PY
    mv -f "$out.tmp" "$out"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WHEEL_SHA256" && -s "$CACHE/digits.csv" && -s "$CACHE/digits.rst" ]]; then
    write_safetensors
    echo "$CACHE"
    exit 0
fi

command -v unzip >/dev/null || die "unzip is needed"
command -v gunzip >/dev/null || die "gunzip is needed"
# shellcheck source=scripts/pinned_wheel.sh
. "$(dirname "${BASH_SOURCE[0]}")/pinned_wheel.sh"
fetch_pinned_wheel fetch_digits "$PACKAGE" "$VERSION" "$WHEEL" "$WHEEL_SHA256" "$CACHE/wheel" "~9 MB" --python-version 3.11 --platform manylinux_2_28_x86_64
wheel="$CACHE/wheel/$WHEEL"

tmp="$(mktemp -d "$CACHE/.unpack.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
unzip -q "$wheel" sklearn/datasets/data/digits.csv.gz sklearn/datasets/descr/digits.rst -d "$tmp" ||
    die "cannot unpack the digits from $wheel"
gunzip -c "$tmp/sklearn/datasets/data/digits.csv.gz" >"$tmp/digits.csv"
got="$(sha256 "$tmp/digits.csv")"
[[ "$got" == "$CSV_SHA256" ]] || die "digits.csv has sha256 $got, expected $CSV_SHA256"
rm -f "$STAMP"
mv -f "$tmp/digits.csv" "$CACHE/digits.csv"
mv -f "$tmp/sklearn/datasets/descr/digits.rst" "$CACHE/digits.rst"
rm -f "$CACHE/digits.safetensors"
write_safetensors
echo "$WHEEL_SHA256" >"$STAMP"
echo "fetch_digits: unpacked the digits data set into $CACHE" >&2
echo "$CACHE"
