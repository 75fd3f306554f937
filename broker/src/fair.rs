//! The node's publish work shared fairly between queues.
//!
//! Every queue has its own logs, flushers, admission and quota, but the
//! runtime's workers and the cores are the node's. Without a quota, a queue
//! whose producers publish as fast as the broker answers would take as many
//! workers as it has calls in flight, and every other queue's calls would
//! queue behind its work. [`FairShare`] bounds the calls doing the CPU part
//! of a publish (claiming keys done: admission, building and appending the
//! records) to `slots` at once across the node. A call that finds every slot
//! taken waits in its queue's line, and a freed slot goes to the next queue
//! in turn that has a call waiting (round robin over queues, one call per
//! turn): a queue that floods the node waits behind itself, while a queue
//! with one call waiting is served after at most one call of each other
//! waiting queue. When nobody waits a call takes a slot at once, so a queue
//! alone gets every slot (the sharing is work-conserving).
//!
//! What is not in the slot: decoding the request (done before the handler
//! runs), the quota wait (a call waits for its quota turn first, holding
//! nothing), and the wait for the group commit (no CPU; holding a slot across
//! it would bound a node's unary publishes by slots per fsync).

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Instant,
};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::queue::QueueName;

/// Hands out the node's publish slots fairly between queues.
#[derive(Debug)]
pub struct FairShare {
    slots: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Slots no call holds. Positive only while no call waits.
    free: usize,
    /// Queues with calls waiting, in turn order (each once).
    turns: VecDeque<QueueName>,
    /// Each waiting queue's line of calls, oldest first. A call that gave
    /// up waiting leaves its entry behind; a grant skips it.
    lines: HashMap<QueueName, VecDeque<oneshot::Sender<()>>>,
}

impl FairShare {
    /// `slots` at least 1 (validated by the config).
    pub fn new(slots: usize) -> FairShare {
        let slots = slots.max(1);
        FairShare { slots, state: Mutex::new(State { free: slots, ..State::default() }) }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Calls waiting for a slot now (those that gave up included until
    /// their turn comes), for the stats.
    pub fn waiting(&self) -> usize {
        self.state.lock().lines.values().map(VecDeque::len).sum()
    }

    /// Waits for a slot for a call of `queue`. Cancel-safe: a call dropped
    /// while waiting takes nothing (a slot granted to it at that moment
    /// goes to the next in turn).
    pub async fn acquire(self: &Arc<Self>, queue: &QueueName) -> Slot {
        let receiver = {
            let mut state = self.state.lock();
            if state.free > 0 {
                state.free -= 1;
                return Slot { fair: Some(Arc::clone(self)) };
            }
            let (sender, receiver) = oneshot::channel();
            match state.lines.get_mut(queue) {
                Some(line) => line.push_back(sender),
                None => {
                    state.lines.insert(queue.clone(), VecDeque::from([sender]));
                    state.turns.push_back(queue.clone());
                }
            }
            receiver
        };
        let started = Instant::now();
        let mut waiter = Waiter { receiver, fair: self, granted: false };
        // The sender is only dropped with a grant or with the FairShare,
        // which this call holds an Arc of: Err cannot happen, and a slot
        // is granted either way.
        let _ = (&mut waiter.receiver).await;
        waiter.granted = true;
        crate::metrics::record_publish_turn_wait(started.elapsed());
        Slot { fair: Some(Arc::clone(self)) }
    }

    /// Gives a freed slot to the next queue in turn with a live waiter,
    /// or back to the free count.
    fn release(&self) {
        let mut state = self.state.lock();
        while let Some(queue) = state.turns.pop_front() {
            let Some(line) = state.lines.get_mut(&queue) else { continue };
            let next = line.pop_front();
            if line.is_empty() {
                state.lines.remove(&queue);
            } else {
                state.turns.push_back(queue);
            }
            if let Some(sender) = next {
                if sender.send(()).is_ok() {
                    return;
                }
            }
        }
        state.free += 1;
        debug_assert!(state.free <= self.slots, "more slots freed than taken");
    }
}

/// A call's publish slot; freed (given to the next in turn) on drop.
#[derive(Debug)]
pub struct Slot {
    fair: Option<Arc<FairShare>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(fair) = self.fair.take() {
            fair.release();
        }
    }
}

/// A call waiting in its queue's line. Dropped before its grant was taken,
/// it closes its channel; a grant that raced in is passed on.
struct Waiter<'a> {
    receiver: oneshot::Receiver<()>,
    fair: &'a FairShare,
    granted: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        self.receiver.close();
        if self.receiver.try_recv().is_ok() {
            self.fair.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Future, pin::pin, task::Poll};

    use super::*;

    fn name(s: &str) -> QueueName {
        QueueName::parse(s).expect("a valid name")
    }

    /// Polls once: whether the future completed.
    fn ready<F: Future>(future: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        match future.poll(&mut std::task::Context::from_waker(waker)) {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_queue_alone_takes_every_slot_and_waits_only_past_them() {
        let fair = Arc::new(FairShare::new(2));
        let a = name("a");
        let first = fair.acquire(&a).await;
        let _second = fair.acquire(&a).await;
        let mut third = pin!(fair.acquire(&a));
        assert!(ready(third.as_mut()).is_none(), "a third call waits while two slots are held");
        drop(first);
        assert!(ready(third.as_mut()).is_some(), "a freed slot goes to the waiting call");
    }

    #[tokio::test]
    async fn freed_slots_alternate_between_waiting_queues() {
        let fair = Arc::new(FairShare::new(1));
        let (flood, steady) = (name("flood"), name("steady"));
        let held = fair.acquire(&flood).await;
        // Three flood calls wait, then one steady call.
        let mut f1 = pin!(fair.acquire(&flood));
        let mut f2 = pin!(fair.acquire(&flood));
        let mut f3 = pin!(fair.acquire(&flood));
        let mut s1 = pin!(fair.acquire(&steady));
        for waiting in [ready(f1.as_mut()), ready(f2.as_mut()), ready(f3.as_mut()), ready(s1.as_mut())] {
            assert!(waiting.is_none());
        }
        drop(held);
        let slot = ready(f1.as_mut()).expect("the flood's first waiter was first in turn");
        drop(slot);
        // The steady queue's turn comes before the flood's second call.
        assert!(ready(f2.as_mut()).is_none());
        let slot = ready(s1.as_mut()).expect("the steady call is served after one flood call");
        drop(slot);
        let _f2_slot = ready(f2.as_mut()).expect("then the flood's second call");
        assert!(ready(f3.as_mut()).is_none());
    }

    #[tokio::test]
    async fn a_cancelled_waiter_passes_its_turn_on() {
        let fair = Arc::new(FairShare::new(1));
        let (a, b) = (name("a"), name("b"));
        let held = fair.acquire(&a).await;
        let mut gone = Box::pin(fair.acquire(&a));
        assert!(ready(gone.as_mut()).is_none());
        let mut next = pin!(fair.acquire(&b));
        assert!(ready(next.as_mut()).is_none());
        drop(gone);
        drop(held);
        assert!(ready(next.as_mut()).is_some(), "the slot skipped the cancelled call");
        assert_eq!(fair.waiting(), 0);
    }

    #[tokio::test]
    async fn a_grant_racing_a_cancellation_is_not_lost() {
        let fair = Arc::new(FairShare::new(1));
        let a = name("a");
        let held = fair.acquire(&a).await;
        let mut granted_then_dropped = Box::pin(fair.acquire(&a));
        assert!(ready(granted_then_dropped.as_mut()).is_none());
        // The slot is handed to the waiter, which is dropped before it
        // polls again: the slot must come back.
        drop(held);
        drop(granted_then_dropped);
        let mut again = pin!(fair.acquire(&a));
        let _slot = ready(again.as_mut()).expect("the slot came back to the free count");
        assert_eq!(fair.state.lock().free, 0);
    }
}
