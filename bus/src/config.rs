//! Server configuration: a TOML file (unknown keys are errors), overridden by flags.
//!
//! ```toml
//! data_dir = "./justizbus-data"
//! listen = "127.0.0.1:50051"
//! # log = "file://./justizbus-data"   (default: file://<data_dir>)
//!
//! [log_settings]
//! segment_bytes = 134217728
//!
//! [delivery]
//! ack_deadline_ms = 30000
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Everything `justizbus serve` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Directory of the embedded log and state.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: String,
    /// Log URL; `file://<data_dir>` when absent.
    pub log: Option<String>,
    /// Storage settings.
    pub log_settings: LogSettings,
    /// Delivery defaults and limits.
    pub delivery: DeliverySettings,
    /// Largest blob (attached document) accepted by `Blobs.Upload`; blobs live in `<data_dir>/blobs`.
    pub max_blob_bytes: u64,
    /// Participants directory, mailboxes and router (off without a directory).
    pub routing: crate::routing::router::RoutingSettings,
    /// Mutual TLS; without it the server listens on loopback only.
    pub tls: Option<crate::security::tls::TlsSettings>,
    /// Kafka client settings, used with `log = "kafka://..."`.
    pub kafka: crate::log::kafka::KafkaSettings,
    /// Checkpoint signing and the delivery journal.
    pub audit: crate::audit::AuditSettings,
    /// Least time between two returns of a thread's freed memory to the system (see
    /// [`crate::memory`]); 0 leaves it to the allocator alone.
    pub memory_release_interval_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("./justizbus-data"),
            listen: "127.0.0.1:50051".into(),
            log: None,
            log_settings: LogSettings::default(),
            delivery: DeliverySettings::default(),
            max_blob_bytes: 1024 * 1024 * 1024,
            routing: Default::default(),
            tls: None,
            kafka: Default::default(),
            audit: Default::default(),
            memory_release_interval_ms: crate::memory::DEFAULT_INTERVAL_MS,
        }
    }
}

impl ServerConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        toml::from_str(&text).map_err(|e| Error::invalid("config", format!("{}: {e}", path.display())))
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<()> {
        if self.max_blob_bytes == 0 {
            return Err(Error::invalid("max_blob_bytes", "must be at least 1"));
        }
        let l = &self.log_settings;
        if l.segment_bytes < 4096 || l.segment_bytes > u64::from(u32::MAX) {
            return Err(Error::invalid("log_settings.segment_bytes", "must be between 4096 and 4294967295 (index positions are 32-bit)"));
        }
        if l.index_interval_bytes == 0 {
            return Err(Error::invalid("log_settings.index_interval_bytes", "must be at least 1"));
        }
        if l.max_event_bytes == 0 || l.max_event_bytes as u64 >= l.segment_bytes {
            return Err(Error::invalid("log_settings.max_event_bytes", "must be at least 1 and smaller than segment_bytes"));
        }
        let r = &self.routing;
        if r.batch == 0 || r.batch > self.delivery.max_unacked_limit || r.mailbox_partitions == 0 || r.ingest_partitions == 0 {
            return Err(Error::invalid(
                "routing",
                "batch must be between 1 and delivery.max_unacked_limit; mailbox_partitions and ingest_partitions at least 1",
            ));
        }
        if self.tls.is_some() && self.routing.directory.is_none() {
            return Err(Error::invalid("tls", "mTLS needs routing.directory: client certificates name participants of the directory"));
        }
        let a = &self.audit;
        if a.checkpoint_records == 0 || a.checkpoint_interval_ms < 10 {
            return Err(Error::invalid("audit", "checkpoint_records must be at least 1, checkpoint_interval_ms at least 10"));
        }
        let d = &self.delivery;
        if d.default_max_unacked == 0 || d.default_max_unacked > d.max_unacked_limit {
            return Err(Error::invalid("delivery.default_max_unacked", "must be between 1 and max_unacked_limit"));
        }
        if d.max_attempts == 0 || d.ack_deadline_ms == 0 || d.min_backoff_ms > d.max_backoff_ms {
            return Err(Error::invalid(
                "delivery",
                "max_attempts and ack_deadline_ms must be positive, min_backoff_ms at most max_backoff_ms",
            ));
        }
        Ok(())
    }

    /// The log URL in force.
    pub fn log_url(&self) -> String {
        self.log.clone().unwrap_or_else(|| format!("file://{}", self.data_dir.display()))
    }
}

/// Settings of the log (embedded backend) and of publishing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A segment is rolled once it reaches this size.
    pub segment_bytes: u64,
    /// One sparse index entry per this many bytes of log.
    pub index_interval_bytes: u64,
    /// An event id appended again within this window is stored once (0 disables dedup).
    pub dedup_window_ms: u64,
    /// At most this many recent ids are remembered per partition (about 30 bytes each).
    pub dedup_max_ids: usize,
    /// Largest accepted event (encoded envelope).
    pub max_event_bytes: usize,
    /// How often retention runs.
    pub retention_check_ms: u64,
    /// Memory sled may use as cache.
    pub state_cache_bytes: u64,
    /// Most bytes one group commit writes before it syncs.
    pub max_batch_bytes: usize,
    /// Memory for recently read batches, which several readers of one batch share (the
    /// mailboxes above all); 0 turns the cache off.
    pub read_cache_bytes: usize,
    /// Bytes of each partition's newest log data left in the OS page cache once durable;
    /// older written pages are dropped from it (drop-behind), so writing reuses a small set
    /// of page-cache pages instead of taking fresh memory for every write (0: the kernel
    /// keeps what it likes). Readers further behind read from the disk.
    pub page_cache_window_bytes: u64,
    /// Maintain the per-partition hash chain on append (DESIGN.md section 8). Off only to
    /// measure what it costs: records appended without it cannot be verified.
    pub hash_chain: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            segment_bytes: 128 * 1024 * 1024,
            index_interval_bytes: 8 * 1024,
            dedup_window_ms: 7 * 24 * 3600 * 1000,
            dedup_max_ids: 1_000_000,
            max_event_bytes: 16 * 1024 * 1024,
            retention_check_ms: 60_000,
            state_cache_bytes: 32 * 1024 * 1024,
            max_batch_bytes: 1024 * 1024,
            read_cache_bytes: 32 * 1024 * 1024,
            page_cache_window_bytes: 64 * 1024 * 1024,
            hash_chain: true,
        }
    }
}

/// Delivery defaults (a group may override the first four) and limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// Time a subscriber has to acknowledge a delivery before it is redelivered.
    pub ack_deadline_ms: u32,
    /// Failed deliveries (nack or expiry) before dead-lettering and quarantine.
    pub max_attempts: u32,
    /// First redelivery backoff; doubles per attempt.
    pub min_backoff_ms: u32,
    /// Longest redelivery backoff.
    pub max_backoff_ms: u32,
    /// Credit a subscriber gets when it asks for none.
    pub default_max_unacked: u32,
    /// Most credit a subscriber may ask for.
    pub max_unacked_limit: u32,
    /// Most events a group buffers (read but unacknowledged), bounding memory.
    pub max_buffered_events: usize,
    /// Most payload bytes a group buffers.
    pub max_buffered_bytes: usize,
    /// Most payload bytes all groups together buffer (a soft limit: over it, a group that
    /// holds nothing still reads a few events, so every group makes progress).
    pub max_buffered_bytes_total: usize,
    /// How often group cursors are persisted.
    pub commit_interval_ms: u64,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            ack_deadline_ms: 30_000,
            max_attempts: 5,
            min_backoff_ms: 200,
            max_backoff_ms: 60_000,
            default_max_unacked: 100,
            max_unacked_limit: 10_000,
            max_buffered_events: 20_000,
            max_buffered_bytes: 64 * 1024 * 1024,
            max_buffered_bytes_total: 256 * 1024 * 1024,
            commit_interval_ms: 1000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<ServerConfig>("listen = 'x'\nbogus = 1\n").expect_err("unknown key");
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn impossible_values_are_rejected() {
        assert!(ServerConfig::default().validate().is_ok());
        let c: ServerConfig = toml::from_str("[log_settings]\nsegment_bytes = 10000000000\n").expect("parses");
        assert!(c.validate().is_err());
        let c: ServerConfig = toml::from_str("[delivery]\nmin_backoff_ms = 5000\nmax_backoff_ms = 10\n").expect("parses");
        assert!(c.validate().is_err());
    }

    #[test]
    fn partial_config_keeps_defaults() {
        let c: ServerConfig = toml::from_str("[delivery]\nmax_attempts = 3\n").expect("parses");
        assert_eq!(c.delivery.max_attempts, 3);
        assert_eq!(c.delivery.ack_deadline_ms, 30_000);
        assert_eq!(c.log_url(), "file://./justizbus-data");
    }

    #[test]
    fn the_docker_configs_are_valid() {
        for name in ["bus1.toml", "bus2.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker").join(name);
            let c = ServerConfig::load(&path).expect("parses");
            c.validate().expect("valid");
            assert!(c.audit.signing_key.is_some(), "{name} signs checkpoints");
        }
    }
}
