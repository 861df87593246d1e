//! Generated types of the `justizbus.v1` gRPC API.
//!
//! This crate holds no logic: the bus converts these types into its own
//! core types at the edge (see `justizbus::event`).
#![allow(missing_docs, clippy::all)]

/// `justizbus.v1`: envelope, publish, subscribe, replay and admin services.
pub mod v1 {
    tonic::include_proto!("justizbus.v1");

    /// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("justizbus_v1_descriptor");
}
