#!/usr/bin/env bash
# Fetch the wheels that the GPU machine lacks into .whl/ (git-ignored), for run_all.sh to install there.
#
#   bash benchmarks/gpu/fetch_wheels.sh      # on a machine that reaches PyPI; then carry .whl to the GPU machine
#
# The device image has torch (CUDA 13.0), lightning and older transformers and peft, but not
# bitsandbytes. This fetches bitsandbytes (its wheel cut to the CPU and CUDA 13 kernels: 7 MiB, not 41)
# and the transformers and peft that the test suite pins here, so both sides of a comparison are the
# versions measured on the CPU. Python 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/../.."
BNB=${BITSANDBYTES_VERSION:-0.50.2}
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$@"
}
fetch "bitsandbytes==$BNB" "transformers==${TRANSFORMERS_VERSION:-5.24.0}" "peft==${PEFT_VERSION:-0.21.2}"
wheel=$(ls .whl/bitsandbytes-"$BNB"-*.whl)
slim=$(mktemp -d)
(cd "$slim" && unzip -q "$OLDPWD/$wheel" \
  && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete \
  && record=$(ls -d bitsandbytes-*.dist-info)/RECORD \
  && grep -v -E 'libbitsandbytes_(cuda1[0-2]|rocm|xpu)' "$record" > "$record.new" && mv "$record.new" "$record" \
  && rm "$OLDPWD/$wheel" && zip -qr "$OLDPWD/$wheel" .)
rm -rf "$slim"
ls -l .whl
