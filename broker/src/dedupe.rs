//! Idempotent publish: a key seen on a queue within its dedupe window maps
//! to the original receipt.
//!
//! Memory is bounded by [`DEDUPE_KEYS_MAX`](crate::limits::DEDUPE_KEYS_MAX):
//! past it the oldest key is forgotten early (and counted). A key being
//! published right now is `Pending`: a concurrent publish of the same key
//! waits for the first one's outcome instead of storing a second copy.

use std::collections::{HashMap, VecDeque, hash_map::Entry};

use bytes::Bytes;
use tokio::sync::watch;

use crate::limits::DEDUPE_KEYS_MAX;

/// Where a keyed message was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub lane: u32,
    pub offset: u64,
}

#[derive(Debug)]
enum Slot {
    Stored {
        at: Stored,
        timestamp_ms: u64,
    },
    /// Being published; the sender resolves when the publish ends.
    Pending(watch::Receiver<bool>),
}

/// The outcome of looking a key up.
#[derive(Debug)]
pub enum Lookup {
    /// Seen before: answer with the original receipt.
    Seen(Stored),
    /// Someone is publishing it now: wait, then look again.
    Wait(watch::Receiver<bool>),
    /// New: the caller publishes it and must call `stored` or `abandon`.
    Claimed(watch::Sender<bool>),
}

#[derive(Debug)]
pub struct Dedupe {
    window_ms: u64,
    slots: HashMap<Bytes, Slot>,
    /// Stored keys by insertion time, for expiry and eviction.
    order: VecDeque<(u64, Bytes)>,
    /// Keys forgotten before their window ended because of the bound.
    pub evicted_early: u64,
}

impl Dedupe {
    pub fn new(window_ms: u64) -> Dedupe {
        Dedupe { window_ms, slots: HashMap::new(), order: VecDeque::new(), evicted_early: 0 }
    }

    pub fn lookup(&mut self, key: &Bytes, now_ms: u64) -> Lookup {
        self.expire(now_ms);
        match self.slots.entry(key.clone()) {
            Entry::Occupied(mut slot) => match slot.get() {
                Slot::Stored { at, .. } => Lookup::Seen(*at),
                // The claimer went away without `stored` or `abandon` (its
                // call was cancelled: a client deadline or disconnect drops
                // the publish mid-way). Waiting on it would never end (a
                // waiter would spin on the closed channel), so this caller
                // takes the claim over.
                Slot::Pending(rx) if rx.has_changed().is_err() => {
                    let (tx, rx) = watch::channel(false);
                    slot.insert(Slot::Pending(rx));
                    Lookup::Claimed(tx)
                }
                Slot::Pending(rx) => Lookup::Wait(rx.clone()),
            },
            Entry::Vacant(slot) => {
                let (tx, rx) = watch::channel(false);
                slot.insert(Slot::Pending(rx));
                Lookup::Claimed(tx)
            }
        }
    }

    /// Records a claimed key as stored.
    pub fn stored(&mut self, key: Bytes, at: Stored, timestamp_ms: u64, claim: watch::Sender<bool>) {
        self.insert(key, at, timestamp_ms);
        let _ = claim.send(true);
    }

    /// Releases a claim whose publish failed: a waiter will try itself.
    pub fn abandon(&mut self, key: &Bytes, claim: watch::Sender<bool>) {
        if matches!(self.slots.get(key), Some(Slot::Pending(_))) {
            self.slots.remove(key);
        }
        let _ = claim.send(true);
    }

    /// Inserts keys recovered from storage, oldest first: only the newest
    /// [`DEDUPE_KEYS_MAX`] are kept (the older ones count as evicted early),
    /// with room reserved once rather than grown key by key.
    pub fn recover(&mut self, keys: Vec<(u64, Bytes, Stored)>) {
        let excess = keys.len().saturating_sub(DEDUPE_KEYS_MAX);
        self.evicted_early += excess as u64;
        let count = keys.len() - excess;
        self.slots.reserve(count);
        self.order.reserve(count);
        for (timestamp_ms, key, at) in keys.into_iter().skip(excess) {
            self.insert(key, at, timestamp_ms);
        }
    }

    /// Inserts a key recovered from storage or just stored.
    pub fn insert(&mut self, key: Bytes, at: Stored, timestamp_ms: u64) {
        self.slots.insert(key.clone(), Slot::Stored { at, timestamp_ms });
        self.order.push_back((timestamp_ms, key));
        while self.order.len() > DEDUPE_KEYS_MAX {
            self.evict_front();
            self.evicted_early += 1;
        }
    }

    fn expire(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(self.window_ms);
        while self.order.front().is_some_and(|(t, _)| *t < cutoff) {
            self.evict_front();
        }
    }

    fn evict_front(&mut self) {
        if let Some((timestamp_ms, key)) = self.order.pop_front()
            && let Some(Slot::Stored { timestamp_ms: t, .. }) = self.slots.get(&key)
            && *t == timestamp_ms
        {
            self.slots.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_within_window_then_forgotten() {
        let mut d = Dedupe::new(1000);
        let key = Bytes::from_static(b"k");
        let Lookup::Claimed(claim) = d.lookup(&key, 0) else { panic!("new key must be claimed") };
        assert!(matches!(d.lookup(&key, 1), Lookup::Wait(_)));
        d.stored(key.clone(), Stored { lane: 1, offset: 7 }, 0, claim);
        assert!(matches!(d.lookup(&key, 999), Lookup::Seen(Stored { lane: 1, offset: 7 })));
        assert!(matches!(d.lookup(&key, 1001), Lookup::Claimed(_)), "past the window the key is new again");
    }

    #[test]
    fn abandoned_claim_lets_the_next_publisher_in() {
        let mut d = Dedupe::new(1000);
        let key = Bytes::from_static(b"k");
        let Lookup::Claimed(claim) = d.lookup(&key, 0) else { panic!() };
        let Lookup::Wait(mut rx) = d.lookup(&key, 0) else { panic!() };
        d.abandon(&key, claim);
        assert!(*rx.borrow_and_update());
        assert!(matches!(d.lookup(&key, 0), Lookup::Claimed(_)));
    }

    /// A claim whose publish was cancelled (the claim dropped without an
    /// outcome) does not block the key: the next publisher claims it
    /// instead of waiting forever.
    #[test]
    fn dropped_claim_lets_the_next_publisher_in() {
        let mut d = Dedupe::new(1000);
        let key = Bytes::from_static(b"k");
        let Lookup::Claimed(claim) = d.lookup(&key, 0) else { panic!("new key must be claimed") };
        let Lookup::Wait(rx) = d.lookup(&key, 0) else { panic!("claimed keys make others wait") };
        drop(claim);
        assert!(rx.has_changed().is_err(), "a waiter wakes when the claim drops");
        let Lookup::Claimed(claim) = d.lookup(&key, 0) else { panic!("a dropped claim is taken over") };
        d.stored(key.clone(), Stored { lane: 0, offset: 3 }, 0, claim);
        assert!(matches!(d.lookup(&key, 1), Lookup::Seen(Stored { lane: 0, offset: 3 })));
    }
}
