#!/usr/bin/env bash
# Runs every test of the workspace: unit, property and conformance tests next to the code, and
# the end-to-end tests in tests/ that start the real `justizbus` binary.
set -euo pipefail
cd "$(dirname "$0")/.."
# The end-to-end tests run the binary, so build it first.
cargo build --workspace --bins
cargo test --workspace
