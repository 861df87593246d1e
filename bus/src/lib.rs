//! Justizbus: the event bus of the justice cloud.
//!
//! The crate is layered as DESIGN.md section 1 describes, dependencies pointing one way:
//!
//! - [`event`]: the core event type and its validation, converted from the generated
//!   `justizbus_proto` types at the edge;
//! - [`log`]: the partitioned log trait ([`log::Log`]) and its backends (embedded files by default);
//! - [`delivery`]: consumer groups with per-key ordered, at-least-once delivery;
//! - [`routing`]: participants directory, mailboxes, and the router with receipts;
//! - [`audit`]: hash chains, signed checkpoints, verification, proofs, the delivery journal;
//! - [`security`]: mTLS identities, authorization, test certificates;
//! - [`grpc`]: the gRPC services; [`server`]: wiring and `run(listener, shutdown)`;
//! - [`cli`], [`bench`] and [`demo`]: the `justizbus` command line, used by the thin `main`;
//! - [`process`]: a `justizbus serve` child process, for the benchmark and end-to-end tests.

pub mod audit;
pub mod bench;
pub mod blob;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod error;
pub mod event;
pub mod grpc;
pub mod log;
pub mod memory;
pub mod partitioner;
pub mod process;
pub mod routing;
pub mod security;
pub mod server;
pub mod sharded;

pub use error::{Error, Result};

/// A hash map hashing with foldhash instead of SipHash. The maps every delivery passes
/// (deliveries in flight, case keys, mailbox ids, a batch's ids) hashed with SipHash, which
/// showed in about a tenth of the server's profile samples in `bench routing`. foldhash is seeded per process, so
/// keys that clients choose (event ids, case keys) cannot be picked ahead to collide.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
