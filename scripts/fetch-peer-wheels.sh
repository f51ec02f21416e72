#!/usr/bin/env bash
# Downloads the peer packages that scripts/gpu-check.sh benchmarks beside Tessera (issue 7) as
# wheels into target/peer-wheels/ (git-ignored), checking each against a pinned sha256.
# The GPU machine has no network: the folder travels there with the device tool's `carry`
# (docs/GPU.md, "Peer benchmarks"), and scripts/bench_infcl.py installs the wheel from it with
# `pip install --no-deps --no-index`. Nothing of the peers' code is kept in this repository.
#
# Idempotent: a wheel already there with the right hash is kept; a wrong one is replaced.
# Usage: scripts/fetch-peer-wheels.sh            (needs PyPI for the first download only)
set -euo pipefail
cd "$(dirname "$0")/.."

dest="target/peer-wheels"
mkdir -p "$dest"

# name==version, wheel file, sha256. The hash is PyPI's (its simple index lists it beside the
# file), seen on 2026-11-27; pip also checks it while downloading (--require-hashes).
peers=(
    "inf-cl==1.2.1 inf_cl-1.2.1-py3-none-any.whl c9657b6ddd592a08ce41906eb81f865f4d7ddafda2287215702be1e0e5bd8acf"
)

python="${PYTHON:-python3}"
req="$(mktemp)"
trap 'rm -f "$req"' EXIT
for entry in "${peers[@]}"; do
    read -r spec file sha <<<"$entry"
    path="$dest/$file"
    if [[ -f "$path" ]] && [[ "$(sha256sum "$path" | cut -d' ' -f1)" == "$sha" ]]; then
        echo "fetch-peer-wheels: $path present, sha256 ok"
        continue
    fi
    rm -f "$path"
    echo "$spec --hash=sha256:$sha" >"$req"
    echo "fetch-peer-wheels: downloading $spec"
    if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
        -r "$req" -d "$dest"; then
        echo "fetch-peer-wheels: pip could not download $spec with sha256 $sha (needs PyPI;" \
            "a hash mismatch means the file on the index changed: check it by hand before" \
            "updating the pin in $0)" >&2
        exit 1
    fi
    got="$(sha256sum "$path" 2>/dev/null | cut -d' ' -f1)"
    if [[ "$got" != "$sha" ]]; then
        echo "fetch-peer-wheels: $path has sha256 '${got:-missing}', expected $sha" >&2
        rm -f "$path"
        exit 1
    fi
    echo "fetch-peer-wheels: $path ok (sha256 $sha)"
done
