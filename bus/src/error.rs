//! The one error type of the `justizbus` library, and its mapping to gRPC statuses.

use tonic::Code;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request names a topic that was never created.
    #[error("topic {0:?} does not exist (create it with `justizbus topics create`)")]
    UnknownTopic(String),
    /// A topic of this name exists already.
    #[error("topic {name:?} already exists with {partitions} partitions")]
    TopicExists {
        /// Topic name.
        name: String,
        /// Its partition count.
        partitions: u32,
    },
    /// A partition number outside the topic.
    #[error("topic {topic:?} has {partitions} partitions; partition {partition} does not exist")]
    UnknownPartition {
        /// Topic name.
        topic: String,
        /// Requested partition.
        partition: u32,
        /// Partition count of the topic.
        partitions: u32,
    },
    /// A field of a request is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The offending field, e.g. `event.subject`.
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// An event larger than the configured limit.
    #[error("event of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Encoded size of the event.
        size: usize,
        /// The configured limit (`max_event_bytes`).
        limit: usize,
    },
    /// An ack or nack for a delivery that this subscriber does not hold.
    #[error("unknown delivery id {0} (never issued to this subscriber, already acknowledged, or expired and redelivered)")]
    UnknownDelivery(u64),
    /// The consumer group does not exist.
    #[error("consumer group {group:?} on topic {topic:?} does not exist")]
    UnknownGroup {
        /// Topic name.
        topic: String,
        /// Group name.
        group: String,
    },
    /// The key is not quarantined in this group.
    #[error("key {key:?} is not quarantined in group {group:?}")]
    NotQuarantined {
        /// Group name.
        group: String,
        /// The key.
        key: String,
    },
    /// A stored file is damaged beyond what recovery repairs.
    #[error("corrupt log data in {path}: {reason}")]
    Corrupt {
        /// The damaged file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An I/O failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What the bus was doing.
        context: String,
        /// The operating system error (shown in the message, so not chained again).
        source: std::io::Error,
    },
    /// A requested offset is outside the stored range.
    #[error("offset {offset} of partition {partition} is outside the stored range [{start}, {end})")]
    OffsetOutOfRange {
        /// Partition.
        partition: u32,
        /// Requested offset.
        offset: u64,
        /// Log start.
        start: u64,
        /// High watermark.
        end: u64,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(String),
    /// The sled state store failed (the message says how; not chained again).
    #[error("state store: {0}")]
    State(String),
    /// No blob with this SHA-256 is stored.
    #[error("blob {0} is not stored (upload it with Blobs.Upload first)")]
    UnknownBlob(String),
    /// An upload larger than `max_blob_bytes`.
    #[error("blob exceeds the limit of {limit} bytes")]
    BlobTooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// A broken invariant inside the bus.
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller is authenticated but not allowed to do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The caller could not be identified (no or unknown client certificate).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// TLS material (certificates, keys) could not be loaded or made.
    #[error("TLS: {0}")]
    Tls(String),
    /// The log or the delivery engine has stopped (shutdown in progress).
    #[error("the bus is shutting down")]
    ShuttingDown,
    /// The log backend cannot be reached or did not answer in time (e.g. a Kafka broker is
    /// down); retrying later may succeed. A publish that failed this way may or may not be
    /// stored: retry it with the same event id.
    #[error("log backend unavailable: {0}")]
    Unavailable(String),
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::State(e.to_string())
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// The gRPC status code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Error::UnknownTopic(_) | Error::UnknownGroup { .. } | Error::UnknownDelivery(_) | Error::UnknownBlob(_) => Code::NotFound,
            Error::UnknownPartition { .. } | Error::OffsetOutOfRange { .. } => Code::OutOfRange,
            Error::TopicExists { .. } => Code::AlreadyExists,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::TooLarge { .. } | Error::BlobTooLarge { .. } => Code::ResourceExhausted,
            Error::NotQuarantined { .. } => Code::FailedPrecondition,
            Error::Corrupt { .. } => Code::DataLoss,
            Error::Io { .. } | Error::State(_) | Error::Serve(_) | Error::Internal(_) => Code::Internal,
            Error::ShuttingDown | Error::Unavailable(_) => Code::Unavailable,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Tls(_) => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        use tonic_types::{ErrorDetails, StatusExt};
        let message = err.to_string();
        match &err {
            Error::InvalidArgument { field, reason } => {
                let details = ErrorDetails::with_bad_request_violation(field.clone(), reason.clone());
                tonic::Status::with_error_details(err.code(), message, details)
            }
            _ => tonic::Status::new(err.code(), message),
        }
    }
}
