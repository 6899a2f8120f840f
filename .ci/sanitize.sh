#!/usr/bin/env bash
# Sanitizer jobs: the kernel and the pybind11 bindings built with a sanitizer, loaded into
# an ordinary CPython through LD_PRELOAD, running a reduced test set. Needs python with
# numpy, pytest, hypothesis, pybind11, cmake and ninja (the .ci/run venv).
#   bash .ci/sanitize.sh            ASan + UBSan: exactness, bad input, optimizers, plan, stateful, interrupts
#   bash .ci/sanitize.sh thread     ThreadSanitizer: the tests that run the work pool's threads
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-address}
t0=$(date +%s)
work=$(mktemp -d)
python -m pip install -q "pybind11>=3" ninja cmake

case "$mode" in
  address) link="-fsanitize=address,undefined"; san="$link -fno-sanitize-recover=undefined"; runtime=libasan ;;
  thread) link="-fsanitize=thread"; san="$link"; runtime=libtsan ;;
  *) echo "usage: $0 [address|thread]"; exit 2 ;;
esac
echo "== sanitizers ($mode): build _core with $link"
cmake -S . -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTADAM_BUILD_PYTHON=ON \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python)" \
  -DCMAKE_CXX_FLAGS="$san -fno-omit-frame-pointer -g" -DCMAKE_SHARED_LINKER_FLAGS="$link" >"$work/cmake.log" 2>&1 \
  || { cat "$work/cmake.log"; exit 1; }
cmake --build "$work/build" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }

# The package sources with the sanitized module in place of any other build.
mkdir -p "$work/site"
cp -r python/fastadam "$work/site/fastadam"
find "$work/site/fastadam" -name '_core*.so' -delete
cp "$work"/build/_core*.so "$work/site/fastadam/"
# Captured first: "ldd | grep -q" can die of SIGPIPE under pipefail when grep exits at the first match.
libs=$(ldd "$work"/site/fastadam/_core*.so)
grep -qE "$runtime" <<<"$libs" || { echo "the module is not linked against $runtime"; exit 1; }
cp -r tests "$work/tests"

echo "== sanitizers ($mode): reduced test set"
# libstdc++ preloaded too: CPython does not link it, and the sanitizer's __cxa_throw
# interceptor must resolve the real one at start-up (else the first C++ exception aborts).
libstdcxx=$(g++ -print-file-name=libstdc++.so.6)
libsan=$(gcc -print-file-name="$runtime.so")
test -e "$libsan" && test -e "$libstdcxx"
export LD_PRELOAD="$libsan $libstdcxx"
# Reports go to files as well as stderr: pytest's fd capture would swallow them on abort.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_init_order=1:log_path=$work/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$work/ubsan"
export TSAN_OPTIONS="halt_on_error=1:abort_on_error=1:log_path=$work/tsan"
report() { for f in "$work"/asan.* "$work"/ubsan.* "$work"/tsan.*; do [[ -e $f ]] && { echo "--- $f"; cat "$f"; }; done; return 0; }
export PYTHONPATH="$work/site"
cd "$work"
python -c "
import fastadam, fastadam._core as c
print('module under test:', c.__file__)
assert c.__file__.startswith('$work/site/'), c.__file__
print('ISAs:', fastadam.available_isas(), 'selected:', fastadam.get_isa())"
if [[ $mode == thread ]]; then
  # Steps on two threads per call, late workers, several Python threads stepping, interrupts.
  python -m pytest -q -p no:cacheprovider -x -k "not torch" \
    tests/test_exactness.py tests/test_optim.py tests/test_interrupts.py tests/test_stateful.py || { report; exit 1; }
else
  python -m pytest -q -p no:cacheprovider -x \
    tests/test_exactness.py tests/test_bad_input.py tests/test_optim.py || { report; exit 1; }
  echo "-- the plan, the stateful test and the interrupted steps (NumPy; torch is not loaded under ASan)"
  python -m pytest -q -p no:cacheprovider -x -k "not torch" \
    tests/test_plan.py tests/test_stateful.py tests/test_interrupts.py || { report; exit 1; }
  echo "-- again with the baseline path forced (the SSE2/NEON kernel)"
  FASTADAM_ISA=baseline python -m pytest -q -p no:cacheprovider -x tests/test_exactness.py tests/test_optim.py || { report; exit 1; }
fi
unset LD_PRELOAD
if compgen -G "$work/asan.*" >/dev/null || compgen -G "$work/ubsan.*" >/dev/null || compgen -G "$work/tsan.*" >/dev/null; then
  echo "sanitizer reports:"; report; exit 1
fi
echo "no $mode sanitizer report"
echo "== sanitizer job ($mode) done in $(( $(date +%s) - t0 )) s"
