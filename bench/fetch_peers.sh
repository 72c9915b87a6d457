#!/usr/bin/env bash
# Download the public peers that bench/linear_cross_entropy.py compares with (cut-cross-entropy
# as `cce`, liger-kernel as `liger`) as wheels into bench/peers/ (git-ignored), at the versions
# the benchmarks were written against. The GPU machines have no network: run this here, then
# hand bench/peers to the device tool's `carry`; bench/gpu_suite.sh installs whatever wheels
# it finds there (step `peers`) before the benchmarks.
#
#   bash bench/fetch_peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/peers
python -m pip download --no-deps --only-binary=:all: -d bench/peers \
  "cut-cross-entropy==25.1.1" "liger-kernel==0.8.5"
ls -l bench/peers
