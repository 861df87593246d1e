#!/usr/bin/env bash
# Runs every test of the workspace: unit, property and conformance tests next to the code, and
# the end-to-end tests in tests/ that start the real `justizbus` binary.
set -euo pipefail
cd "$(dirname "$0")/.."
# The XJustiz tests compare our verdicts with libxml2's: install xmllint when it is missing.
if ! command -v xmllint >/dev/null; then
    echo "installing libxml2-utils (xmllint) ..."
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libxml2-utils >/dev/null
fi
# The Kafka backend's tests need a real Kafka-protocol broker: install and start one.
source scripts/kafka-broker.sh
# The end-to-end tests run the binary, so build it first.
cargo build --workspace --bins
cargo test --workspace
# The delivery, routing, security and audit tests again, unchanged, on the Kafka backend (the other
# end-to-end tests are about the embedded log's files: torn segments, its data directory lock).
JUSTIZBUS_TEST_BACKEND=kafka cargo test -p justizbus-e2e --test delivery --test routing --test security --test audit
