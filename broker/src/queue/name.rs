//! `QueueName`: parsed once, valid everywhere after.

use std::fmt;

use crate::{
    error::{BrokerError, Result},
    limits::{DEAD_LETTER_SUFFIX, QUEUE_NAME_SIZE_MAX},
};

/// A queue name matching `[a-z0-9][a-z0-9._-]{0,127}`, or a dead-letter
/// queue's name: such a name plus [`DEAD_LETTER_SUFFIX`] (up to
/// `QUEUE_NAME_SIZE_MAX + 5` bytes), so that every name a user may create
/// can have its dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(String);

impl QueueName {
    pub fn parse(name: &str) -> Result<QueueName> {
        let invalid = |reason| BrokerError::InvalidQueueName { name: name.chars().take(200).collect(), reason };
        let mut bytes = name.bytes();
        let Some(first) = bytes.next() else { return Err(invalid("it is empty")) };
        // The limit applies to what users type; a dead-letter queue's name
        // carries its suffix on top.
        if name.ends_with(DEAD_LETTER_SUFFIX) {
            if name.len() > QUEUE_NAME_SIZE_MAX + DEAD_LETTER_SUFFIX.len() {
                return Err(invalid("a dead-letter queue's name is at most 128 bytes plus \".dead\""));
            }
        } else if name.len() > QUEUE_NAME_SIZE_MAX {
            return Err(invalid("it is longer than 128 bytes"));
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(invalid("it must start with a-z or 0-9"));
        }
        if !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-') {
            return Err(invalid("only a-z, 0-9, '.', '_' and '-' are allowed"));
        }
        Ok(QueueName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, valid: bool) {
        assert_eq!(QueueName::parse(name).is_ok(), valid, "{name:?}");
    }

    #[test]
    fn names() {
        check("payments", true);
        check("a", true);
        check("0.emails_v2-eu", true);
        check(&"a".repeat(128), true);
        check(&"a".repeat(129), false);
        // A dead-letter queue's name may carry its suffix past the limit.
        check(&format!("{}.dead", "a".repeat(128)), true);
        check(&format!("{}.dead", "a".repeat(129)), false);
        check("", false);
        check("Payments", false);
        check("-x", false);
        check(".x", false);
        check("a/b", false);
        check("a b", false);
        check("é", false);
    }
}
