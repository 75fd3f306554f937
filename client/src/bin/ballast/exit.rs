//! Exit codes scripts can rely on (also listed in `ballast --help`).

use std::fmt;

use ballast_client::Error;

/// Anything else: broker internal error, unsupported command, I/O.
pub const OTHER: u8 = 1;
/// Usage error or invalid argument (clap also exits with 2).
pub const USAGE: u8 = 2;
/// Unknown queue.
pub const NOT_FOUND: u8 = 3;
/// Queue exists with other settings.
pub const ALREADY_EXISTS: u8 = 4;
/// Refused: resource exhausted, or the circuit breaker is open.
pub const REFUSED: u8 = 5;
/// Broker unreachable, shutting down, or the deadline passed.
pub const UNAVAILABLE: u8 = 6;
/// The broker did not accept the credentials, or the principal may not do
/// this.
pub const DENIED: u8 = 7;

/// A failed command.
#[derive(Debug)]
pub enum CliError {
    /// The client library failed.
    Client(Error),
    /// The client library failed and the command already printed why
    /// (publish prints each distinct failure as it happens).
    Reported(Error),
    /// The command line made no sense in a way clap cannot see.
    Usage(String),
    /// Reading stdin or writing stdout failed.
    Io(std::io::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => USAGE,
            CliError::Io(_) => OTHER,
            CliError::Client(error) | CliError::Reported(error) => client_exit_code(error),
        }
    }
}

/// The exit code for a library error. Every variant known today is named;
/// `Error` is non-exhaustive, so a variant added later exits with OTHER until
/// it is given a code here.
pub fn client_exit_code(error: &Error) -> u8 {
    match error {
        Error::InvalidArgument { .. } | Error::InvalidAddress { .. } => USAGE,
        Error::NotFound { .. } => NOT_FOUND,
        Error::AlreadyExists { .. } => ALREADY_EXISTS,
        Error::ResourceExhausted { .. } | Error::CircuitOpen { .. } => REFUSED,
        Error::Unavailable { .. }
        | Error::NotLeader { .. }
        | Error::Transport { .. }
        | Error::DeadlineExceeded { .. } => UNAVAILABLE,
        Error::Unauthenticated { .. } | Error::PermissionDenied { .. } => DENIED,
        Error::Aborted { .. }
        | Error::FailedPrecondition { .. }
        | Error::Broker { .. }
        | Error::Protocol { .. }
        | Error::Tls { .. }
        | Error::Closed => OTHER,
        _ => OTHER,
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Client(error) | CliError::Reported(error) => write!(f, "{error}"),
            CliError::Usage(message) => write!(f, "{message}"),
            CliError::Io(error) => write!(f, "{error}"),
        }
    }
}

impl From<Error> for CliError {
    fn from(error: Error) -> CliError {
        CliError::Client(error)
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> CliError {
        CliError::Io(error)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The documented codes for the documented outcomes.
    #[test]
    fn codes() {
        let cases = [
            (Error::InvalidArgument { message: String::new() }, USAGE),
            (Error::NotFound { message: String::new() }, NOT_FOUND),
            (Error::AlreadyExists { message: String::new() }, ALREADY_EXISTS),
            (Error::ResourceExhausted { message: String::new(), retry_after: None, refusal: None }, REFUSED),
            (Error::CircuitOpen { retry_in: Duration::ZERO }, REFUSED),
            (Error::Unavailable { message: String::new() }, UNAVAILABLE),
            (Error::Transport { message: String::new() }, UNAVAILABLE),
            (Error::DeadlineExceeded { timeout: None, last_error: None }, UNAVAILABLE),
            (Error::Closed, OTHER),
        ];
        for (error, code) in cases {
            assert_eq!(client_exit_code(&error), code, "{error:?}");
        }
        assert_eq!(CliError::Usage("x".into()).exit_code(), USAGE);
    }
}
