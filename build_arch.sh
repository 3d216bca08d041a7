#!/usr/bin/env bash
# Build one helexa_native wheel per GPU architecture into wheelhouse/.
#
#   ./build_arch.sh                 # sm80 sm89 sm90 sm100
#   ./build_arch.sh sm90 sm89       # only these (also accepted: 90, sm_90, 9.0, sm90a)
#
# Each wheel holds machine code (SASS) for exactly one architecture and gets
# that architecture as its local version (helexa_native-0.1.0+sm90-...whl), so
# a host installs the one wheel matching its GPU; the runtime refuses a GPU
# whose architecture the installed build lacks and names the wheel to install.
# After each build, cuobjdump checks that the wheel's _C library holds that
# architecture's SASS and no other; any mismatch stops the script.
#
# Needs a CUDA build of torch in the Python used (PYTHON, default python3),
# the CUDA toolkit it was built with (nvcc, cuobjdump), and the pip packages
# setuptools and wheel. Environment: PYTHON, WHEELHOUSE (default wheelhouse),
# MAX_JOBS (parallel compile jobs).
set -euo pipefail

cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}

die() {
  echo "build_arch.sh: error: $*" >&2
  exit 1
}

if [ "$#" -gt 0 ]; then
  ARCHS=("$@")
else
  ARCHS=(sm80 sm89 sm90 sm100)
fi

# --- toolchain -------------------------------------------------------------
"$PYTHON" -c "import torch" 2>/dev/null || die "$PYTHON cannot import torch; install a CUDA build of torch first"
TORCH_CUDA=$("$PYTHON" -c "import torch; print(torch.version.cuda or '')")
[ -n "$TORCH_CUDA" ] || die "the torch in $PYTHON is a CPU-only build ($("$PYTHON" -c 'import torch; print(torch.__version__)')); per-architecture wheels need a CUDA build of torch (e.g. pip install torch --index-url https://download.pytorch.org/whl/cu128)"
CUDA_HOME_DIR=$("$PYTHON" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')")
[ -n "$CUDA_HOME_DIR" ] || die "no CUDA toolkit found (set CUDA_HOME); torch was built with CUDA $TORCH_CUDA"
CUOBJDUMP="$CUDA_HOME_DIR/bin/cuobjdump"
[ -x "$CUOBJDUMP" ] || CUOBJDUMP=$(command -v cuobjdump || true)
[ -n "$CUOBJDUMP" ] || die "cuobjdump not found in $CUDA_HOME_DIR/bin or PATH; it checks each wheel's machine code"
"$PYTHON" -c "import wheel, setuptools" 2>/dev/null || die "$PYTHON needs the setuptools and wheel packages"

# sm90 / sm_90 / 90 / 9.0 / sm90a -> "90" / "90a"
arch_tag() {
  local a=${1#sm}
  a=${a#_}
  if [[ $a =~ ^([0-9]+)\.([0-9])(a?)$ ]]; then
    a="${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}"
  fi
  [[ $a =~ ^[0-9]{2,3}a?$ ]] || die "cannot read '$1' as a GPU architecture (examples: sm80, sm_90, 8.9, sm100)"
  echo "$a"
}

# "90" -> "9.0", "100a" -> "10.0a" (TORCH_CUDA_ARCH_LIST form)
arch_dotted() {
  local t=$1 suffix=""
  if [[ $t == *a ]]; then
    suffix=a
    t=${t%a}
  fi
  echo "${t:0:${#t}-1}.${t: -1}${suffix}"
}

mkdir -p "$WHEELHOUSE"
BUILT=()
for arg in "${ARCHS[@]}"; do
  tag=$(arch_tag "$arg")
  dotted=$(arch_dotted "$tag")
  local_version="sm${tag}"
  echo "==> building helexa_native for sm_${tag} (TORCH_CUDA_ARCH_LIST=${dotted}, local version +${local_version})"

  # Objects of another architecture must not leak into this wheel.
  rm -rf build helexa_native.egg-info
  rm -f "$WHEELHOUSE"/helexa_native-*+"${local_version}"-*.whl
  TORCH_CUDA_ARCH_LIST="$dotted" HX_LOCAL_VERSION="$local_version" HX_BUILD_CPU_ONLY=0 \
    "$PYTHON" -m pip wheel . --no-build-isolation --no-deps -w "$WHEELHOUSE" \
    || die "the build for sm_${tag} failed"

  whl=$(ls -t "$WHEELHOUSE"/helexa_native-*+"${local_version}"-*.whl 2>/dev/null | head -n 1 || true)
  [ -n "$whl" ] || die "no wheel with local version +${local_version} appeared in $WHEELHOUSE"

  tmp=$(mktemp -d)
  "$PYTHON" - "$whl" "$tmp" <<'EOF'
import sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    libs = [n for n in z.namelist() if n.startswith("helexa_native/_C") and n.endswith(".so")]
    if len(libs) != 1:
        sys.exit(f"expected one helexa_native/_C*.so in {whl}, found {libs}")
    z.extract(libs[0], out)
    print(libs[0])
EOF
  so=$(ls "$tmp"/helexa_native/_C*.so)
  elf=$("$CUOBJDUMP" --list-elf "$so" 2>&1 || true)
  found=$(grep -oE 'sm_[0-9]+a?' <<<"$elf" | sort -u | tr '\n' ' ' | sed 's/ $//')
  ptx=$("$CUOBJDUMP" --list-ptx "$so" 2>/dev/null | grep -oE 'sm_[0-9]+a?' | sort -u | tr '\n' ' ' || true)
  rm -rf "$tmp"
  if [ "$found" != "sm_${tag}" ]; then
    echo "$elf" >&2
    die "$(basename "$whl") holds SASS for [${found:-nothing}], expected exactly sm_${tag}"
  fi
  [ -z "$ptx" ] || echo "note: $(basename "$whl") also embeds PTX for: $ptx"
  echo "ok: $(basename "$whl") holds sm_${tag} machine code only"
  BUILT+=("$whl")
done

rm -rf build helexa_native.egg-info
echo
echo "wheels:"
printf '  %s\n' "${BUILT[@]}"
