//! Typed errors, split by operation so `?` cannot carry an error to a caller
//! that cannot act on it.

use std::{io, path::PathBuf, sync::Arc};

/// Opening (and recovering) a log failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid log options: {0}")]
    InvalidOptions(String),
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a Ballast log file: {reason}")]
    NotALog { path: PathBuf, reason: String },
    #[error("{path} uses format version {found}; this build reads version {supported}")]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },
}

/// Appending a batch failed. Nothing of the batch is visible to readers.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the batch is empty")]
    BatchEmpty,
    #[error("the batch holds {count} records; the limit is {max}")]
    BatchTooLarge { count: usize, max: usize },
    #[error("record {index} of the batch is {size} bytes encoded; the log's limit is {max}")]
    RecordTooLarge { index: usize, size: u64, max: u32 },
    #[error("record {index} has an idempotency key of {size} bytes; the limit is {max}")]
    KeyTooLarge { index: usize, size: usize, max: u32 },
    /// The key is `Some` of no bytes. It is refused rather than dropped: the
    /// caller meant a key, and no dedupe could be done on it. Pass `None` for
    /// no key.
    #[error("record {index} has an empty idempotency key; pass no key instead")]
    KeyEmpty { index: usize },
    #[error("record {index} has {count} headers; the limit is {max}")]
    TooManyHeaders { index: usize, count: usize, max: u32 },
    #[error("record {index} has {size} bytes of headers; the limit is {max}")]
    HeadersTooLarge { index: usize, size: u64, max: u32 },
    #[error("disk full while creating segment {path}; nothing was appended, retry when space returns")]
    DiskFull { path: PathBuf },
    /// Creating a segment for the batch, or syncing the directory after it,
    /// failed (other than with ENOSPC). Nothing of the batch was written and
    /// the log is not poisoned: a later append may succeed. A failed write of
    /// the records themselves is [`AppendError::Poisoned`] instead.
    #[error("I/O error on {path}: {source}; nothing was appended")]
    Io { path: PathBuf, source: io::Error },
    #[error("a previous I/O error poisoned the log ({0}); reopen it to recover")]
    Poisoned(SyncError),
}

/// Reading a record failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("offset {offset} is not written yet (next offset is {next_offset})")]
    NotWritten { offset: u64, next_offset: u64 },
    #[error("offset {offset} was removed by retention (first retained offset is {first_offset})")]
    Removed { offset: u64, first_offset: u64 },
    #[error(
        "records {first_offset}..={last_offset} in segment {segment_base} failed validation ({reason}); quarantined"
    )]
    Corrupt { segment_base: u64, first_offset: u64, last_offset: u64, reason: String },
}

/// Acknowledging offsets failed. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("offset {offset} is not written yet (next offset is {next_offset})")]
    OutOfRange { offset: u64, next_offset: u64 },
    #[error("a previous I/O error poisoned the log ({0}); reopen it to recover")]
    Poisoned(SyncError),
}

/// Syncing failed: the page cache may have dropped the data, so the log is
/// poisoned and every later append, ack and commit fails with this error until
/// the log is reopened (recovery then establishes what is really on disk).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{context}: {source}")]
pub struct SyncError {
    pub context: Arc<str>,
    pub source: Arc<io::Error>,
}

impl PartialEq for SyncError {
    fn eq(&self, other: &Self) -> bool {
        self.context == other.context && self.source.kind() == other.source.kind()
    }
}

impl SyncError {
    pub(crate) fn new(context: impl Into<Arc<str>>, source: io::Error) -> SyncError {
        SyncError { context: context.into(), source: Arc::new(source) }
    }
}

pub(crate) fn io_open(path: impl AsRef<std::path::Path>) -> impl FnOnce(io::Error) -> OpenError {
    let path = path.as_ref().to_path_buf();
    move |source| OpenError::Io { path, source }
}
