#!/usr/bin/env bash
# Starts a Kafka-protocol broker for the tests: tansu (Apache-2.0, written in Rust, on
# crates.io), installed into cargo's bin directory when missing (about 15 minutes on 2 cores,
# once per machine), storing into SQLite (its in-memory engine reports wrong high watermarks
# for batches of several records). Source this file; it exports JUSTIZBUS_TEST_KAFKA=127.0.0.1:PORT and
# JUSTIZBUS_TANSU (the binary), and stops the broker when the calling shell exits.
TANSU_VERSION=0.6.0
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
export JUSTIZBUS_TANSU="$CARGO_BIN/tansu"
if ! "$JUSTIZBUS_TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    echo "installing tansu $TANSU_VERSION (Kafka-protocol broker for the tests) ..."
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql --quiet
fi
tansu_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
tansu_dir=$(mktemp -d)
(cd "$tansu_dir" && RUST_LOG=${TANSU_LOG:-warn} exec "$JUSTIZBUS_TANSU" broker --storage-engine sqlite://broker.db \
    --listener-url "tcp://127.0.0.1:$tansu_port" --advertised-listener-url "tcp://127.0.0.1:$tansu_port" \
    >"$tansu_dir/broker.log" 2>&1) &
tansu_pid=$!
trap 'kill $tansu_pid 2>/dev/null; wait $tansu_pid 2>/dev/null; rm -rf "$tansu_dir"' EXIT
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$tansu_port") 2>/dev/null; then break; fi
    sleep 0.1
done
if ! kill -0 $tansu_pid 2>/dev/null; then
    echo "tansu did not start:"; cat "$tansu_dir/broker.log"; exit 1
fi
export JUSTIZBUS_TEST_KAFKA="127.0.0.1:$tansu_port"
echo "Kafka-protocol broker (tansu $TANSU_VERSION) on $JUSTIZBUS_TEST_KAFKA"
