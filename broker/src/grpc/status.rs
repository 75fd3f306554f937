//! `BrokerError` to gRPC status: exhaustive, so a new error must be mapped.

use tonic::{Code, Status};

use crate::error::BrokerError;

/// The status a client sees for `error`. Storage failures are logged here
/// with their detail; the client gets INTERNAL with the same text.
pub fn to_status(error: BrokerError) -> Status {
    let code = match &error {
        BrokerError::QueueNotFound(_) => Code::NotFound,
        BrokerError::InvalidQueueName { .. } | BrokerError::InvalidSetting { .. } | BrokerError::InvalidArgument(_) => {
            Code::InvalidArgument
        }
        BrokerError::QueueExists { .. } => Code::AlreadyExists,
        BrokerError::FailedPrecondition(_) | BrokerError::UnknownDelivery { .. } => Code::FailedPrecondition,
        BrokerError::LimitReached { .. } | BrokerError::DiskFull(_) => Code::ResourceExhausted,
        BrokerError::ShuttingDown => Code::Unavailable,
        BrokerError::Storage(_) => {
            tracing::error!(%error, "storage failure answered as INTERNAL");
            Code::Internal
        }
    };
    Status::new(code, error.to_string())
}
