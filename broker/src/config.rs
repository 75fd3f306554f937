//! The broker's configuration: every setting with one named default, read
//! from an optional TOML file and overridden by flags.
//!
//! ```toml
//! data_dir = "./data"
//! listen = "127.0.0.1:7400"
//! shutdown_timeout_ms = 10000
//!
//! [storage]
//! segment_size = 67108864
//!
//! [queue_defaults]   # the defaults of every new queue
//! lanes = ["high", "normal", "low"]
//! lane_weights = [4, 2, 1]
//! lease_timeout_ms = 30000
//! max_attempts = 5
//! ```

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::queue::QueueSettings;

/// Default data directory.
pub const DATA_DIR_DEFAULT: &str = "./data";
/// Default gRPC address: loopback only.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7400";
/// Default Prometheus metrics address: loopback only.
pub const METRICS_LISTEN_DEFAULT: &str = "127.0.0.1:7401";
/// Default disk watermark: publishes stop below 512 MiB free.
pub const DISK_FREE_MIN_BYTES_DEFAULT: u64 = 512 * 1024 * 1024;
/// How long a graceful shutdown waits for in-flight requests, in ms.
pub const SHUTDOWN_TIMEOUT_MS_DEFAULT: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where queues live.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Longest wait for in-flight requests on SIGTERM/SIGINT, in ms.
    pub shutdown_timeout_ms: u64,
    /// Prometheus `/metrics` HTTP address: loopback by default.
    pub metrics_listen: SocketAddr,
    /// Publishes are refused while the data directory's filesystem has less
    /// free space than this, in bytes (consumers, acks and admin go on).
    pub disk_free_min_bytes: u64,
    pub storage: StorageConfig,
    /// Settings a new queue gets for every field its creator leaves unset.
    pub queue_defaults: QueueSettings,
    /// Test seam, never read from a file: failures to inject into every
    /// log's I/O (see `ballast_storage::Faults`).
    #[serde(skip)]
    pub faults: FaultSeam,
}

/// [`Config::faults`]: equal when both are the same `Faults` (or none).
#[derive(Debug, Clone, Default)]
pub struct FaultSeam(pub Option<std::sync::Arc<ballast_storage::Faults>>);

impl PartialEq for FaultSeam {
    fn eq(&self, other: &FaultSeam) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

/// Storage settings shared by every lane's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Size of each segment file, in bytes.
    pub segment_size: u64,
    /// Synced bytes between checkpoints (bounds crash recovery), in bytes.
    pub checkpoint_interval_bytes: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            listen: LISTEN_DEFAULT.parse().expect("the default listen address parses"),
            shutdown_timeout_ms: SHUTDOWN_TIMEOUT_MS_DEFAULT,
            metrics_listen: METRICS_LISTEN_DEFAULT.parse().expect("the default metrics address parses"),
            disk_free_min_bytes: DISK_FREE_MIN_BYTES_DEFAULT,
            storage: StorageConfig::default(),
            queue_defaults: QueueSettings::default(),
            faults: FaultSeam::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig {
            segment_size: ballast_storage::limits::SEGMENT_SIZE_DEFAULT,
            checkpoint_interval_bytes: ballast_storage::limits::CHECKPOINT_INTERVAL_BYTES_DEFAULT,
        }
    }
}

impl Config {
    /// Parses a TOML config file's text.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting; the message names the key and the range.
    pub fn validate(&self) -> Result<(), String> {
        self.queue_defaults.validate().map_err(|e| format!("queue_defaults: {e}"))?;
        let log = self.log_options(&self.queue_defaults);
        log.validate().map_err(|e| format!("storage: {e}"))?;
        Ok(())
    }

    /// Storage options of one lane of a queue with `settings`.
    pub fn log_options(&self, settings: &QueueSettings) -> ballast_storage::LogOptions {
        let headroom = ballast_storage::limits::RECORD_HEADER_SIZE
            + ballast_storage::limits::KEY_SIZE_MAX
            + ballast_storage::limits::HEADERS_SIZE_MAX;
        let segment_room = self.storage.segment_size.saturating_sub(ballast_storage::limits::SEGMENT_HEADER_SIZE);
        let record_size_max = u64::from(settings.message_size_max + headroom).min(segment_room);
        ballast_storage::LogOptions {
            segment_size: self.storage.segment_size,
            record_size_max: u32::try_from(record_size_max).unwrap_or(u32::MAX),
            sync_policy: settings.storage_policy(),
            checkpoint_interval_bytes: self.storage.checkpoint_interval_bytes,
            dedupe_window_ms: settings.dedupe_window_ms,
            dedupe_keys_max: u32::try_from(crate::limits::DEDUPE_KEYS_MAX).unwrap_or(u32::MAX),
            faults: self.faults.0.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn file_overrides_and_unknown_keys_are_refused() {
        let c = Config::from_toml("listen = \"127.0.0.1:9000\"\n[queue_defaults]\nlanes = [\"a\"]\nlane_weights = [1]\nlane_admission = [1.0]\ndefault_lane = 0\nlease_timeout_ms = 1000\nmax_attempts = 3\ndead_letter = false\ndedupe_window_ms = 0\nmessage_size_max = 100\nsync_policy = \"none\"\nsync_interval_ms = 5\nstrict_priority = true\n").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.queue_defaults.lanes, vec!["a"]);
        assert!(Config::from_toml("lisen = \"x\"").unwrap_err().contains("lisen"));
        assert!(Config::from_toml("[queue_defaults]\nmax_attempts = 0").unwrap_err().contains("max_attempts"));
    }
}
