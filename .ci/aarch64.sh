#!/usr/bin/env bash
# The aarch64 build, checked on this x86-64 machine (issue 19; docs/design.md, "aarch64"):
# fastadam._core cross-compiled with Debian's aarch64 GCC, then the test suite run by
# Debian 12's arm64 CPython under qemu-user. Root is needed for apt only: no binfmt, no
# chroot, no container. Called by .ci/run with its venv active (pip, cmake, ninja, pybind11).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in python cmake ninja; do
  command -v "$tool" >/dev/null || { echo "$0: $tool not found: run it from .ci/run's venv (pip, cmake, ninja, pybind11)"; exit 1; }
done
# .ci/run's FASTADAM_REQUIRE_AVX512 is about the x86-64 host, not the emulated aarch64 CPU.
unset FASTADAM_REQUIRE_AVX512
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sysroot=$work/sysroot
start=$(date +%s)

echo "-- cross compiler, qemu-user, and Debian's arm64 CPython 3.11 unpacked into $sysroot"
export DEBIAN_FRONTEND=noninteractive
dpkg --add-architecture arm64
apt-get update -qq
apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user >/dev/null
# The interpreter, its headers and every arm64 library they (and the extension: libstdc++,
# libgomp) load, unpacked with dpkg -x, never installed: the host's python3 stays as it is.
pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances \
         python3.11-minimal:arm64 libpython3.11-stdlib:arm64 libpython3.11-dev:arm64 libstdc++6:arm64 libgomp1:arm64 |
       grep -E '^[a-z0-9][^ ]*:arm64$' | grep -vE '^(dpkg|tar|install-info|libc-dev-bin|rpcsvc-proto|perl[^ ]*):arm64$' | sort -u)
mkdir -p "$work/debs" "$sysroot"
# shellcheck disable=SC2086
(cd "$work/debs" && apt-get download -qq $pkgs)
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$sysroot"; done
# sys.executable must run too (tests start Python subprocesses): a host shell script that
# starts the arm64 interpreter under qemu, with itself as argv[0].
python_arm=$sysroot/usr/bin/python3-qemu
printf '#!/bin/sh\nexec qemu-aarch64 -L %s -0 "$0" %s/usr/bin/python3.11 "$@"\n' "$sysroot" "$sysroot" >"$python_arm"
chmod +x "$python_arm"
# The test dependencies as aarch64 wheels from PyPI (NumPy 2.x; Debian's would be 1.24), and
# fastadam below, go where the arm64 interpreter looks (its own dist-packages): the Cython
# test's fresh interpreter must find fastadam installed, not on PYTHONPATH.
site=$sysroot/usr/lib/python3/dist-packages
python -m pip install -q --target "$site" --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
  --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
  numpy "ml_dtypes>=0.4" "pytest>=7" "hypothesis>=6" "threadpoolctl>=3" "cython>=3" setuptools

echo "-- fastadam._core for aarch64 (CMake runs the arm64 interpreter under qemu to find it)"
cat >"$work/toolchain.cmake" <<'EOF'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
EOF
# -idirafter: Debian's Python.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>, which
# only the sysroot has; the C and C++ headers stay the cross compiler's own.
cmake -S . -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTADAM_BUILD_PYTHON=ON \
  -DCMAKE_TOOLCHAIN_FILE="$work/toolchain.cmake" -DCMAKE_CROSSCOMPILING_EMULATOR="qemu-aarch64;-L;$sysroot" \
  -DPython_EXECUTABLE="$sysroot/usr/bin/python3.11" -DCMAKE_CXX_FLAGS="-idirafter $sysroot/usr/include" \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPYBIND11_USE_CROSSCOMPILING=ON >/dev/null
cmake --build "$work/build" >/dev/null
cmake --install "$work/build" --prefix "$work/pkg" >/dev/null  # pkg/fastadam/: _core, the headers
cp -r python/fastadam/. "$work/pkg/fastadam/"
mv "$work/pkg/fastadam" "$site/"
built=$(date +%s)

echo "-- python -m fastadam under qemu (the self-check: every path and thread count against the reference)"
"$python_arm" -m fastadam
echo "-- the test suite under qemu (slow tier included), every test but these, which need what has no place here:"
echo "   torch's (no aarch64 torch is installed: they skip, and run natively in .ci/run; the adapter is Python over this kernel);"
echo "   the examples, README blocks, quantized-state accuracy runs and benchmark harness (scikit-learn, matplotlib, torch,"
echo "   peers; natively in .ci/run);"
echo "   fastadam.distributed's (mpiexec and its ranks under qemu-user; the sharding is Python and MPI over this kernel,"
echo "   whose bits the rest of the suite checks here; natively in .ci/run);"
echo "   two threadpoolctl checks that compare library paths: under qemu -L the loader reports the guest's paths"
echo "   (/usr/lib/...) where /proc/self/maps and the host's ldd give the host's (\$sysroot/usr/lib/...)"
# Debian's Python.h includes the arch's pyconfig.h: the Cython test's build (the cross
# compiler, run natively by setuptools) must see the sysroot's, as CMake's did above.
export CPPFLAGS="-I$sysroot/usr/include/python3.11 -idirafter $sysroot/usr/include"
# CI=false: torch's tests skip instead of failing (CI=true requires torch); every skip is
# then checked against the reasons expected here, so no other one goes unnoticed.
CI=false "$python_arm" -m pytest -q -p no:cacheprovider --color=no -rs tests \
  --ignore=tests/test_torch.py --ignore=tests/test_torch_adapter.py --ignore=tests/test_torch_helper.py \
  --ignore=tests/test_torch_mixed_precision.py --ignore=tests/test_examples_digits.py --ignore=tests/test_readme.py \
  --ignore=tests/test_bench_smoke.py --ignore=tests/test_distributed.py --ignore=tests/test_quantized_accuracy.py \
  --deselect=tests/test_threadpoolctl.py::test_threadpool_info_lists_the_openmp_runtime_fastadam_uses \
  --deselect=tests/test_threadpoolctl.py::test_the_library_ldd_names_is_the_one_threadpoolctl_lists | tee "$work/pytest.log"
unexpected=$(grep '^SKIPPED' "$work/pytest.log" |
  grep -vE 'torch is not installed|the x86-64 paths exist only on x86-64|this CPU has no AVX-512' || true)
if [ -n "$unexpected" ]; then
  echo "unexpected skips under aarch64:"
  echo "$unexpected"
  exit 1
fi
echo "-- aarch64: setup and build $((built - start)) s, tests $(($(date +%s) - built)) s"
