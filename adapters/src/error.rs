//! The one error type of the XJustiz crate.

use std::path::PathBuf;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong reading XJustiz schemas.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system error.
        source: std::io::Error,
    },
    /// A schema file is not well-formed XML.
    #[error("{path}, byte {position}: {message}")]
    Xml {
        /// The file.
        path: PathBuf,
        /// Byte position of the problem.
        position: u64,
        /// What the parser said.
        message: String,
    },
    /// A schema file is well-formed but not a usable XSD.
    #[error("{path}: {message}")]
    Schema {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}
