#!/usr/bin/env bash
# ASan + UBSan job: the kernel and the pybind11 bindings built with
# -fsanitize=address,undefined, loaded into an ordinary CPython through LD_PRELOAD,
# running a reduced test set. Needs python with numpy, pytest, hypothesis, pybind11,
# cmake and ninja (the .ci/run venv). Directly: CI=true bash .ci/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
work=$(mktemp -d)
python -m pip install -q "pybind11>=3" ninja cmake

echo "== sanitizers: build _core with -fsanitize=address,undefined"
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
cmake -S . -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTADAM_BUILD_PYTHON=ON \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python)" \
  -DCMAKE_CXX_FLAGS="$san" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" >"$work/cmake.log" 2>&1 \
  || { cat "$work/cmake.log"; exit 1; }
cmake --build "$work/build" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }

# The package sources with the sanitized module in place of any other build.
mkdir -p "$work/site"
cp -r python/fastadam "$work/site/fastadam"
find "$work/site/fastadam" -name '_core*.so' -delete
cp "$work"/build/_core*.so "$work/site/fastadam/"
# Captured first: "ldd | grep -q" can die of SIGPIPE under pipefail when grep exits at the first match.
libs=$(ldd "$work"/site/fastadam/_core*.so)
grep -qE 'libasan' <<<"$libs" || { echo "the module is not linked against libasan"; exit 1; }
cp -r tests "$work/tests"

echo "== sanitizers: reduced test set under ASan + UBSan"
# libstdc++ preloaded too: CPython does not link it, and ASan's __cxa_throw interceptor
# must resolve the real one at start-up (else the first C++ exception aborts).
libasan=$(gcc -print-file-name=libasan.so)
libstdcxx=$(g++ -print-file-name=libstdc++.so.6)
test -e "$libasan" && test -e "$libstdcxx"
export LD_PRELOAD="$libasan $libstdcxx"
# Reports go to files as well as stderr: pytest's fd capture would swallow them on abort.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_init_order=1:log_path=$work/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$work/ubsan"
report() { for f in "$work"/asan.* "$work"/ubsan.*; do [[ -e $f ]] && { echo "--- $f"; cat "$f"; }; done; return 0; }
export PYTHONPATH="$work/site"
cd "$work"
python -c "
import fastadam, fastadam._core as c
print('module under test:', c.__file__)
assert c.__file__.startswith('$work/site/'), c.__file__
print('ISAs:', fastadam.available_isas(), 'selected:', fastadam.get_isa())"
python -m pytest -q -p no:cacheprovider -x \
  tests/test_exactness.py tests/test_bad_input.py tests/test_optim.py || { report; exit 1; }
echo "-- the plan, the stateful test and the interrupted steps (NumPy; torch is not loaded under ASan)"
python -m pytest -q -p no:cacheprovider -x -k "not torch" \
  tests/test_plan.py tests/test_stateful.py tests/test_interrupts.py || { report; exit 1; }
echo "-- again with the baseline path forced (the SSE2/NEON kernel)"
FASTADAM_ISA=baseline python -m pytest -q -p no:cacheprovider -x tests/test_exactness.py tests/test_optim.py || { report; exit 1; }
unset LD_PRELOAD
if compgen -G "$work/asan.*" >/dev/null || compgen -G "$work/ubsan.*" >/dev/null; then
  echo "sanitizer reports:"; report; exit 1
fi
echo "no ASan/UBSan report"
echo "== sanitizer job done in $(( $(date +%s) - t0 )) s"
