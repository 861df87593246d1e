//! Identities and authorization (DESIGN.md section 9).
//!
//! - [`tls`]: the server side of mutual TLS. The bus does the handshake itself (rustls through
//!   tokio-rustls) so that every refused connection (no certificate, a foreign CA, an expired
//!   certificate) is logged with the peer and the reason before tonic sees the stream.
//! - [`auth`]: who is calling and what they may do. With mTLS the participant id is the common
//!   name of the client certificate and must be in the participants directory; without TLS the
//!   server listens on loopback only and every local caller is the operator.
//! - [`certs`]: `justizbus certs`, a test CA with server and participant certificates (rcgen).

pub mod auth;
pub mod certs;
pub mod tls;
