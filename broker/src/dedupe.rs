//! Idempotent publish: a key seen on a queue within its dedupe window maps
//! to the original receipt.
//!
//! Memory is bounded by [`DEDUPE_KEYS_MAX`](crate::limits::DEDUPE_KEYS_MAX):
//! past it the oldest key is forgotten early (and counted). A key being
//! published right now is `Pending`: a concurrent publish of the same key
//! waits for the first one's outcome instead of storing a second copy.
//!
//! A publish call holds its claims in one [`Claims`] value, which resolves
//! each exactly once: as stored, once the message is durable, or else
//! abandoned, also when the call fails or is dropped halfway. So a claim
//! never outlives the call that made it.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    sync::Arc,
};

use bytes::Bytes;
use parking_lot::Mutex;
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

/// The keys one publish call claimed, each resolved exactly once: recorded
/// with [`Claims::stored`] once its message is durable, or abandoned when
/// this value drops (the call failed, or was cancelled before its message
/// was stored), so that a publisher waiting on the key tries itself.
#[derive(Debug)]
pub struct Claims {
    dedupe: Arc<Mutex<Dedupe>>,
    /// `(message index in the call, key, claim)`, not yet resolved.
    claimed: Vec<(usize, Bytes, watch::Sender<bool>)>,
}

impl Claims {
    pub fn new(dedupe: &Arc<Mutex<Dedupe>>) -> Claims {
        Claims { dedupe: Arc::clone(dedupe), claimed: Vec::new() }
    }

    /// Claims `key` for message `index` of the call, first waiting for any
    /// other call publishing it now. `Some`: the key was stored before
    /// (there is nothing to store; this is where it is). `None`: claimed.
    pub async fn claim(&mut self, index: usize, key: &Bytes, now_ms: u64) -> Option<Stored> {
        loop {
            let lookup = self.dedupe.lock().lookup(key, now_ms);
            match lookup {
                Lookup::Seen(at) => return Some(at),
                Lookup::Claimed(claim) => {
                    self.claimed.push((index, key.clone(), claim));
                    return None;
                }
                Lookup::Wait(mut rx) => {
                    // Ends when the other call resolves its claim (or its
                    // claim drops); then look again.
                    let _ = rx.wait_for(|done| *done).await;
                }
            }
        }
    }

    /// Records as stored the keys whose messages `stored_at` places (their
    /// messages are durable); the other claims stay open.
    pub fn stored(&mut self, stored_at: impl Fn(usize) -> Option<Stored>, timestamp_ms: u64) {
        let mut dedupe = self.dedupe.lock();
        let mut open = Vec::new();
        for (index, key, claim) in self.claimed.drain(..) {
            match stored_at(index) {
                Some(at) => dedupe.stored(key, at, timestamp_ms, claim),
                None => open.push((index, key, claim)),
            }
        }
        self.claimed = open;
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        if self.claimed.is_empty() {
            return;
        }
        let mut dedupe = self.dedupe.lock();
        for (_, key, claim) in self.claimed.drain(..) {
            dedupe.abandon(&key, claim);
        }
    }
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

    /// Changes the window from now on: a key is a duplicate while younger
    /// than `window_ms` (keys already forgotten stay forgotten).
    pub fn set_window(&mut self, window_ms: u64) {
        self.window_ms = window_ms;
    }

    pub fn lookup(&mut self, key: &Bytes, now_ms: u64) -> Lookup {
        self.expire(now_ms);
        match self.slots.entry(key.clone()) {
            Entry::Occupied(mut slot) => match slot.get() {
                Slot::Stored { at, .. } => Lookup::Seen(*at),
                // The claim was dropped without `stored` or `abandon`.
                // `Claims` never does that (it abandons what it drops), but
                // a lost claim must not block its key: waiting on it would
                // never end (a waiter would spin on the closed channel), so
                // this caller takes the claim over.
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

    /// Records a key a replica stored by applying the cluster log. On the
    /// leader the publishing call holds the key's claim and records it
    /// itself; anywhere else it is inserted.
    pub fn applied(&mut self, key: Bytes, at: Stored, timestamp_ms: u64) {
        if !matches!(self.slots.get(&key), Some(Slot::Pending(_)) | Some(Slot::Stored { .. })) {
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

    /// `Claims` resolves every claim once: the stored ones as stored, and
    /// the rest, when it drops (a failed or cancelled call), as abandoned,
    /// which lets a waiting publisher of the key in at once.
    #[tokio::test]
    async fn claims_resolve_each_key_once_however_the_call_ends() {
        let dedupe = Arc::new(Mutex::new(Dedupe::new(1000)));
        let (stored, failed) = (Bytes::from_static(b"stored"), Bytes::from_static(b"failed"));
        let mut claims = Claims::new(&dedupe);
        assert_eq!(claims.claim(0, &stored, 0).await, None, "a new key is claimed");
        assert_eq!(claims.claim(1, &failed, 0).await, None);
        let Lookup::Wait(mut waiter) = dedupe.lock().lookup(&failed, 0) else {
            panic!("claimed keys make others wait")
        };
        claims.stored(|index| (index == 0).then_some(Stored { lane: 0, offset: 9 }), 0);
        assert!(matches!(dedupe.lock().lookup(&stored, 1), Lookup::Seen(Stored { lane: 0, offset: 9 })));
        assert!(!waiter.has_changed().unwrap(), "the other claim is still open");
        drop(claims);
        assert!(*waiter.borrow_and_update(), "dropping the claims abandons the open one");
        let mut retry = Claims::new(&dedupe);
        assert_eq!(retry.claim(0, &stored, 2).await, Some(Stored { lane: 0, offset: 9 }), "stored keys answer");
        assert_eq!(retry.claim(1, &failed, 2).await, None, "an abandoned key is free again");
    }

    /// At most `DEDUPE_KEYS_MAX` keys are kept: at the limit every key is
    /// still answered; one more forgets the oldest (counted), and only it.
    #[test]
    fn keys_past_the_bound_forget_the_oldest() {
        let mut d = Dedupe::new(u64::MAX);
        let key = |n: usize| Bytes::from((n as u64).to_le_bytes().to_vec());
        for n in 0..DEDUPE_KEYS_MAX {
            d.insert(key(n), Stored { lane: 0, offset: n as u64 }, 0);
        }
        assert_eq!((d.slots.len(), d.evicted_early), (DEDUPE_KEYS_MAX, 0), "at the limit nothing is forgotten");
        assert!(matches!(d.lookup(&key(0), 0), Lookup::Seen(Stored { offset: 0, .. })));
        d.insert(key(DEDUPE_KEYS_MAX), Stored { lane: 0, offset: DEDUPE_KEYS_MAX as u64 }, 0);
        assert_eq!((d.slots.len(), d.evicted_early), (DEDUPE_KEYS_MAX, 1), "one past: the oldest goes");
        assert!(matches!(d.lookup(&key(0), 0), Lookup::Claimed(_)), "the oldest key is new again");
        assert!(matches!(d.lookup(&key(1), 0), Lookup::Seen(Stored { offset: 1, .. })), "the next is kept");
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
