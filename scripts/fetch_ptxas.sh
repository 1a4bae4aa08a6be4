#!/usr/bin/env bash
# Fetches NVIDIA's PTX assembler (`ptxas`) into Kiln's cache and prints its path. Idempotent: a
# complete, verified cache is left alone (no network).
#
# Source: the PyPI wheel `nvidia-cuda-nvcc-cu12==12.9.86` (the CUDA 12.9 build of NVIDIA's
# `nvidia-cuda-nvcc` wheel: its cubins load on every CUDA 12 driver), which ships
# `nvidia/cuda_nvcc/bin/ptxas`. The only network access is `pip download` of that one wheel;
# its sha256 (below, the one PyPI publishes) is checked before anything is unpacked. `ptxas` is
# NVIDIA's, under the CUDA Toolkit EULA; it is downloaded to this machine's cache, never stored
# in the repository or in artifacts.
#
# The compiler finds it through KILN_PTXAS (the test suite sets it from this script): with it,
# `kiln compile --target cuda:ARCH` also writes cubins, `kiln inspect --stage ptx` reports
# registers and spills, and tests/compiled.rs assembles every kernel of every shipped model.
#
# Result: ${KILN_CACHE:-$HOME/.cache/kiln}/ptxas/ptxas
# Usage:  scripts/fetch_ptxas.sh           (KILN_CACHE=/some/dir to use another cache)
set -euo pipefail

PACKAGE="nvidia-cuda-nvcc-cu12"
VERSION="12.9.86"
WHEEL="nvidia_cuda_nvcc_cu12-${VERSION}-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl"
WHEEL_SHA256="5d6a0d32fdc7ea39917c20065614ae93add6f577d840233237ff08e9a38f58f0"
MEMBER="nvidia/cuda_nvcc/bin/ptxas"

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}/ptxas"
STAMP="$CACHE/.complete"

die() {
    echo "fetch_ptxas: error: $*" >&2
    exit 1
}

[[ "$(uname -m)" == "x86_64" ]] || die "the pinned wheel is x86-64's; this machine is $(uname -m)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WHEEL_SHA256" && -x "$CACHE/ptxas" ]]; then
    echo "$CACHE/ptxas"
    exit 0
fi

command -v unzip >/dev/null || die "unzip is needed"
# shellcheck source=scripts/pinned_wheel.sh
. "$(dirname "${BASH_SOURCE[0]}")/pinned_wheel.sh"
fetch_pinned_wheel fetch_ptxas "$PACKAGE" "$VERSION" "$WHEEL" "$WHEEL_SHA256" "$CACHE/wheel" "~40 MB" --platform manylinux2010_x86_64
wheel="$CACHE/wheel/$WHEEL"

tmp="$(mktemp -d "$CACHE/.unpack.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
unzip -q "$wheel" "$MEMBER" -d "$tmp" || die "cannot unpack $MEMBER from $wheel"
chmod +x "$tmp/$MEMBER"
"$tmp/$MEMBER" --version >/dev/null || die "the unpacked ptxas does not run on this machine"
rm -f "$STAMP"
mv -f "$tmp/$MEMBER" "$CACHE/ptxas"
echo "$WHEEL_SHA256" >"$STAMP"
echo "fetch_ptxas: unpacked ptxas $VERSION into $CACHE" >&2
echo "$CACHE/ptxas"
