//! Justizbus: the event bus of the justice cloud.
//!
//! The crate is layered as DESIGN.md section 1 describes, dependencies pointing one way:
//!
//! - [`event`]: the core event type and its validation, converted from the generated
//!   `justizbus_proto` types at the edge;
//! - [`log`]: the partitioned log trait ([`log::Log`]) and its backends (embedded files by default);
//! - [`delivery`]: consumer groups with per-key ordered, at-least-once delivery;
//! - [`grpc`]: the gRPC services; [`server`]: wiring and `run(listener, shutdown)`;
//! - [`cli`] and [`bench`]: the `justizbus` command line, used by the thin `main`.

pub mod config;
pub mod error;
pub mod event;
pub mod log;
pub mod partitioner;

pub use error::{Error, Result};
