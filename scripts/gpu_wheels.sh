#!/usr/bin/env bash
# Fill gpu-wheels/ (git-ignored) with the cp312 manylinux x86_64 wheels the GPU machine's image lacks, so that
# scripts/gpu_check.sh can install them there offline (the image has Python 3.12, torch 2.11 + CUDA 13,
# transformers, tokenizers, safetensors, sentencepiece, mpi4py, pyarrow, tensorboard, pytest, numpy, pandas,
# einops, msgpack, ninja, psutil, py-cpuinfo, tqdm, pyyaml, fsspec, huggingface-hub, xxhash; no package index).
# Run here, where pip reaches a registry. torch is never included: the check runs on the image's torch.
#
#   scripts/gpu_wheels.sh [DIR]        # default DIR: gpu-wheels; prints each wheel and the total size
#
# Exit 1 when a wheel cannot be fetched/built or the folder exceeds GPU_WHEELS_MAX_MIB (40): everything the
# device call carries (working tree + wheels) must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu-wheels}
MAX_MIB=${GPU_WHEELS_MAX_MIB:-40}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Every wheel named explicitly (--no-deps): the image's own packages (scripts/gpu_image_packages.txt) stay in
# charge, one version of each here; tests/test_gpu_wheels.py checks that image + these cover every requirement.
# deepspeed/megatron-core/datasets at the project's pins (pyproject.toml); the rest are their requirements
# that the image does not have (pydantic for deepspeed; dill/multiprocess for datasets; hjson for deepspeed;
# zstandard for l2e_dist.data.sources), at the versions verified with them here.
BINARY_WHEELS=(
    megatron-core==0.16.1
    datasets==5.2.0
    pydantic==2.13.4
    pydantic-core==2.46.4
    annotated-types==0.7.0
    typing-inspection==0.4.2
    typing-extensions==4.16.0   # the image has one, of a version never read; pydantic-core needs >= 4.14.1
    hjson==3.1.0
    dill==0.4.1
    multiprocess==0.70.19
    zstandard==0.25.0
)
DEEPSPEED=deepspeed==0.19.8   # published as an sdist only: built here as a pure-Python wheel (DS_BUILD_OPS=0)

rm -rf "$DIR.tmp"
mkdir -p "$DIR.tmp"
for spec in "${BINARY_WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 \
        -d "$DIR.tmp" "$spec" \
        || { echo "gpu_wheels: no cp312 manylinux x86_64 wheel for $spec" >&2; exit 1; }
done
# Build deepspeed's wheel from its sdist without ops (they JIT-build on the GPU machine when used; the check
# uses none). The sdist's build needs torch importable, which it is here; the wheel itself is pure Python.
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$DIR.tmp" "$DEEPSPEED" 2>/dev/null; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR.tmp" "$DEEPSPEED" \
        || { echo "gpu_wheels: could not build a wheel of $DEEPSPEED" >&2; exit 1; }
fi
ls "$DIR.tmp"/deepspeed-*-py3-none-any.whl >/dev/null 2>&1 \
    || { echo "gpu_wheels: the deepspeed wheel is not pure Python (py3-none-any): check DS_BUILD_OPS" >&2; exit 1; }
if ls "$DIR.tmp" | grep -qi '^torch-'; then echo "gpu_wheels: torch must not be carried" >&2; exit 1; fi
# Every wheel must install on the GPU machine's Python: a dry install for cp312 manylinux x86_64 into a scratch
# target (pip checks each wheel's tags), as gpu_check.sh installs them there.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$scratch" --python-version 3.12 \
    --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$DIR.tmp"/*.whl \
    || { echo "gpu_wheels: the wheels do not install together on cp312 manylinux x86_64" >&2; exit 1; }
rm -rf "$DIR"
mv "$DIR.tmp" "$DIR"
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
ls -l "$DIR" | awk 'NR > 1 { printf "gpu_wheels: %8.2f MiB  %s\n", $5 / 1048576, $9 }'
mib=$(awk -v b="$total" 'BEGIN { printf "%.2f", b / 1048576 }')
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $mib MiB in $DIR (limit $MAX_MIB MiB)"
if awk -v b="$total" -v m="$MAX_MIB" 'BEGIN { exit !(b > m * 1048576) }'; then
    echo "gpu_wheels: $DIR is $mib MiB, over the $MAX_MIB MiB limit" >&2
    exit 1
fi
