#!/usr/bin/env bash
# Compile every csrc/*.cu file to an object with nvcc (compile only: nothing is linked or
# run), so the CUDA kernels cannot rot on machines without a GPU or a CUDA build of torch.
# The .cu files include only CUDA runtime headers (see launch.h), so they need no torch.
# When $PYTHON imports torch, the CUDA branch of the tensor glue (ops.cpp, bindings.cpp
# with CGIDM_WITH_CUDA) is also checked, with the host compiler, syntax only.
# Usage: csrc/check_cuda_compile.sh [ARCH]   (default sm_90: the H100/H200 the project targets)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
arch="${1:-sm_90}"
nvcc="${NVCC:-nvcc}"
python="${PYTHON:-python3}"
command -v "$nvcc" >/dev/null || { echo "nvcc not found" >&2; exit 2; }
# nvcc knows where its own headers are (it may be a wrapper script far from them).
cuda_include="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n1)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

jobs=()
run() {  # run NAME CMD...: in the background, output to $out/NAME.log
  local name="$1"; shift
  "$@" >"$out/$name.log" 2>&1 &
  jobs+=("$!:$name")
}
for cu in "$here"/*.cu; do
  name="$(basename "$cu")"
  run "$name" "$nvcc" -c -O2 -std=c++20 -arch="$arch" -Werror all-warnings -I"$here" "$cu" -o "$out/$name.o"
done
if torch_flags="$("$python" -c 'import sysconfig, torch.utils.cpp_extension as c; print(" ".join(["-I" + p for p in c.include_paths()] + ["-I" + sysconfig.get_paths()["include"]]))' 2>/dev/null)"; then
  # A CPU wheel of torch ships c10/cuda headers but not their generated config header.
  # shellcheck disable=SC2086
  run "glue(CGIDM_WITH_CUDA)" "${CXX:-c++}" -fsyntax-only -std=c++20 -DCGIDM_WITH_CUDA \
    -DC10_USING_CUSTOM_GENERATED_MACROS $torch_flags -I"$cuda_include" -I"$here" \
    "$here/ops.cpp" "$here/bindings.cpp"
else
  echo "skip  glue(CGIDM_WITH_CUDA): $python cannot import torch"
fi

status=0
for entry in "${jobs[@]}"; do
  pid="${entry%%:*}"; name="${entry#*:}"
  if wait "$pid"; then
    echo "ok    $name"
  else
    echo "FAIL  $name"; cat "$out/$name.log"; status=1
  fi
done
exit "$status"
