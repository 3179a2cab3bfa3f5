#!/usr/bin/env bash
# Install the test dependencies and run every test: lint, cargo tests, pytest
# (both backends; the device half skips with its reason when /dev/kvm is unusable),
# and a bounded fuzz smoke run. Run from anywhere inside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
echo "== install (release extension + test dependencies)"
"$PY" -m pip install --quiet ".[test]"

echo "== lint"
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
"$PY" -m ruff check .
"$PY" -m ruff format --check .

echo "== cargo test"
cargo test --locked --workspace

echo "== pytest"
# The installed package is what is tested (python/ is not on sys.path).
"$PY" -m pytest -q tests fuzz/python_fuzz.py

echo "== walker permission matrix, whole space (release)"
cargo test --locked --release -p kvmmmu-core --test access_matrix

echo "== cargo-fuzz smoke run (60 s per target, seed corpus copied aside)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
for target in $(cd fuzz && ls fuzz_targets | sed 's/\.rs$//'); do
    work=$(mktemp -d)
    cp fuzz/corpus/"$target"/seed-* "$work"/ 2>/dev/null || true
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" --sanitizer none "$work" -- \
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048)
    rm -rf "$work"
done
