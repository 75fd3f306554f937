//! The reserved headers the broker adds to the copies it stores of a
//! message: a redelivery (re-appended at its lane's tail) and a dead
//! letter. A publish leaves room for all of them
//! ([`RESERVED_HEADERS_COUNT`](crate::limits::RESERVED_HEADERS_COUNT),
//! [`RESERVED_HEADERS_SIZE`](crate::limits::RESERVED_HEADERS_SIZE)), so any
//! published message can always be stored again with them; the tests below
//! check the room against the longest values.

use super::{
    HEADER_ATTEMPTS, HEADER_DEAD_LETTER_REASON, HEADER_EXPIRES_AT, HEADER_NOT_BEFORE, HEADER_ORIGINAL_OFFSET,
    HEADER_SOURCE_LANE, HEADER_SOURCE_OFFSET, HEADER_SOURCE_QUEUE,
};

/// Where a dead letter comes from, for its headers.
pub(crate) struct DeadLetterSource<'a> {
    pub reason: &'a str,
    pub queue: &'a str,
    pub lane: &'a str,
    /// The offset of the copy that used the last attempt.
    pub offset: u64,
    pub attempts: u32,
    /// The offset in the message's publish receipt.
    pub original_offset: u64,
}

/// The offset in the publish receipt of the message stored at `offset`
/// with `headers`: its `ballast-original-offset` if it is a redelivered
/// copy, else `offset` itself.
pub(crate) fn original_offset(headers: &[(String, String)], offset: u64) -> u64 {
    headers.iter().find(|(name, _)| name == HEADER_ORIGINAL_OFFSET).and_then(|(_, v)| v.parse().ok()).unwrap_or(offset)
}

/// The message's headers without the ones the broker sets per copy (its
/// delay and original offset): what a copy starts from, and all that a
/// plain copy carries.
pub(crate) fn own_headers(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    headers.into_iter().filter(|(name, _)| name != HEADER_NOT_BEFORE && name != HEADER_ORIGINAL_OFFSET).collect()
}

/// The message's headers a dead letter starts from: its own, without its
/// TTL's deadline (`ballast-expires-at`), so that a dead letter, expired
/// or not, stays in the dead-letter queue until it is handled.
pub(crate) fn dead_letter_own_headers(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    own_headers(headers).into_iter().filter(|(name, _)| name != HEADER_EXPIRES_AT).collect()
}

/// Headers of a redelivered copy: the message's own, its not-before time
/// (for a nack delay) and its original offset.
pub(crate) fn redelivery_headers(
    own: Vec<(String, String)>,
    not_before_ms: Option<u64>,
    original_offset: u64,
) -> Vec<(String, String)> {
    let mut headers = own;
    if let Some(due) = not_before_ms {
        headers.push((HEADER_NOT_BEFORE.to_owned(), due.to_string()));
    }
    headers.push((HEADER_ORIGINAL_OFFSET.to_owned(), original_offset.to_string()));
    headers
}

/// Headers of a dead letter: the message's own and where it comes from.
pub(crate) fn dead_letter_headers(own: Vec<(String, String)>, source: &DeadLetterSource<'_>) -> Vec<(String, String)> {
    let mut headers = own;
    let reason = if source.reason.is_empty() { "no reason given" } else { source.reason };
    headers.push((HEADER_DEAD_LETTER_REASON.to_owned(), reason.to_owned()));
    headers.push((HEADER_SOURCE_QUEUE.to_owned(), source.queue.to_owned()));
    headers.push((HEADER_SOURCE_LANE.to_owned(), source.lane.to_owned()));
    headers.push((HEADER_SOURCE_OFFSET.to_owned(), source.offset.to_string()));
    headers.push((HEADER_ATTEMPTS.to_owned(), source.attempts.to_string()));
    headers.push((HEADER_ORIGINAL_OFFSET.to_owned(), source.original_offset.to_string()));
    headers
}

#[cfg(test)]
mod tests {
    use ballast_storage::record::headers_size;

    use super::*;
    use crate::limits::{
        LANE_NAME_SIZE_MAX, NACK_REASON_SIZE_MAX, QUEUE_NAME_SIZE_MAX, RESERVED_HEADER_PREFIX, RESERVED_HEADERS_COUNT,
        RESERVED_HEADERS_SIZE,
    };

    /// The room a publish leaves is enough for every copy the broker
    /// stores, at the longest values: a redelivery with a delay, a dead
    /// letter, and a dead letter redelivered inside its dead-letter queue
    /// (which carries both sets, as the reserve counts them).
    #[test]
    fn the_reserved_room_holds_the_longest_copies() {
        let reason = "r".repeat(NACK_REASON_SIZE_MAX);
        let queue = "q".repeat(QUEUE_NAME_SIZE_MAX);
        let lane = "l".repeat(LANE_NAME_SIZE_MAX);
        let source = DeadLetterSource {
            reason: &reason,
            queue: &queue,
            lane: &lane,
            offset: u64::MAX,
            attempts: u32::MAX,
            original_offset: u64::MAX,
        };
        let redelivered = redelivery_headers(Vec::new(), Some(u64::MAX), u64::MAX);
        let dead = dead_letter_headers(Vec::new(), &source);
        let dead_redelivered = redelivery_headers(own_headers(dead.clone()), Some(u64::MAX), u64::MAX);
        for headers in [&redelivered, &dead, &dead_redelivered] {
            assert!(headers.len() as u32 <= RESERVED_HEADERS_COUNT, "{} headers", headers.len());
            assert!(headers_size(headers) <= u64::from(RESERVED_HEADERS_SIZE), "{} bytes", headers_size(headers));
            assert!(headers.iter().all(|(name, _)| name.starts_with(RESERVED_HEADER_PREFIX)));
        }
        assert_eq!(headers_size(&dead_redelivered), u64::from(RESERVED_HEADERS_SIZE), "the reserve is exact");
    }

    /// A copy keeps the message's first offset: set on the first
    /// redelivery, carried by later ones and by the dead letter.
    #[test]
    fn the_original_offset_survives_every_copy() {
        let own = vec![("trace".to_owned(), "t-1".to_owned())];
        assert_eq!(original_offset(&own, 7), 7, "a first delivery is the original");
        let first = redelivery_headers(own_headers(own.clone()), Some(100), original_offset(&own, 7));
        assert_eq!(original_offset(&first, 12), 7, "the copy at 12 is the message published at 7");
        let second = redelivery_headers(own_headers(first.clone()), None, original_offset(&first, 12));
        assert_eq!(second, vec![own[0].clone(), (HEADER_ORIGINAL_OFFSET.to_owned(), "7".to_owned())], "no delay");
        let source = DeadLetterSource {
            reason: "",
            queue: "q",
            lane: "normal",
            offset: 20,
            attempts: 3,
            original_offset: original_offset(&second, 20),
        };
        let dead = dead_letter_headers(own_headers(second), &source);
        let get = |name: &str| dead.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(get(HEADER_ORIGINAL_OFFSET), Some("7"));
        assert_eq!(get(HEADER_SOURCE_OFFSET), Some("20"));
        assert_eq!(get(HEADER_DEAD_LETTER_REASON), Some("no reason given"));
        assert_eq!(dead.iter().filter(|(n, _)| n == HEADER_ORIGINAL_OFFSET).count(), 1);
    }
}
