//! Broker errors. Every variant maps to one gRPC status in
//! `grpc/status.rs`, with a message a person can act on.

use ballast_storage::{AckError, AppendError, OpenError, SyncError};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("queue {0:?} not found")]
    QueueNotFound(String),
    #[error("invalid queue name {name:?}: {reason}")]
    InvalidQueueName { name: String, reason: &'static str },
    #[error("invalid setting {key}: {message}")]
    InvalidSetting { key: &'static str, message: String },
    #[error("queue {name:?} already exists with other settings: {difference}")]
    QueueExists { name: String, difference: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{what} limit reached ({max}); {hint}")]
    LimitReached { what: &'static str, max: usize, hint: &'static str },
    #[error("delivery {delivery_id} is not leased (unknown, already acked, or its lease expired)")]
    UnknownDelivery { delivery_id: u64 },
    #[error("the broker is shutting down; retry against the restarted broker")]
    ShuttingDown,
    #[error("disk full: {0}")]
    DiskFull(String),
    #[error("storage failure: {0}")]
    Storage(String),
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

impl From<AppendError> for BrokerError {
    fn from(e: AppendError) -> BrokerError {
        match e {
            AppendError::BatchEmpty
            | AppendError::BatchTooLarge { .. }
            | AppendError::RecordTooLarge { .. }
            | AppendError::KeyTooLarge { .. }
            | AppendError::TooManyHeaders { .. }
            | AppendError::HeadersTooLarge { .. } => BrokerError::InvalidArgument(e.to_string()),
            AppendError::DiskFull { .. } => BrokerError::DiskFull(e.to_string()),
            AppendError::Io { .. } | AppendError::Poisoned(_) => BrokerError::Storage(e.to_string()),
        }
    }
}

impl From<SyncError> for BrokerError {
    fn from(e: SyncError) -> BrokerError {
        BrokerError::Storage(e.to_string())
    }
}

impl From<AckError> for BrokerError {
    fn from(e: AckError) -> BrokerError {
        BrokerError::Storage(e.to_string())
    }
}

impl From<OpenError> for BrokerError {
    fn from(e: OpenError) -> BrokerError {
        BrokerError::Storage(e.to_string())
    }
}
