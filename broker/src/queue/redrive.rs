//! Redrive: dead letters go back to their source queue, each exactly once.
//!
//! Rules:
//! 1. A dead letter becomes a fresh message of the source queue: its own
//!    headers (the broker's `ballast-*` ones dropped), its source lane (by
//!    name, from `ballast-source-lane`), attempts from zero, published
//!    through the source's ordinary path (quota, dedupe, admission).
//! 2. The copy's idempotency key is derived from the dead letter's place,
//!    `ballast-redrive:<lane>:<offset>` of the dead-letter queue, and the
//!    dead letter is acked only once its copy is durable. So a redrive
//!    interrupted anywhere (kill -9 included) and repeated finds the copies
//!    already stored as duplicates of their keys and only acks: none is
//!    moved twice, none lost, as long as the repeat comes within the source
//!    queue's dedupe window.
//! 3. A dead letter leased to a consumer of the dead-letter queue is
//!    skipped (counted); one leased while its copy was being stored is left
//!    where it is too (its copy stays: that message is then at least once).

use std::sync::{Arc, atomic::Ordering};

use ballast_storage::{AckKind, Record};
use bytes::Bytes;

use super::{HEADER_DEAD_LETTER_REASON, HEADER_SOURCE_LANE, Publish, Queue};
use crate::{
    error::{BrokerError, Result},
    limits::REDRIVE_BATCH_COUNT,
};

/// What a redrive did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redriven {
    /// Dead letters stored again in the source queue and acked.
    pub moved: u64,
    /// Dead letters whose copy an interrupted earlier redrive had already
    /// stored: acked now, nothing stored again.
    pub already_moved: u64,
    /// Dead letters leased to a consumer of the dead-letter queue: left.
    pub skipped_leased: u64,
}

/// A dead letter on its way back.
struct Candidate {
    lane: u32,
    offset: u64,
    size: u64,
    copy: Publish,
}

impl Queue {
    /// Moves up to `max_messages` (`None`: all) dead letters of this queue,
    /// only those whose reason is `reason` when given, back into it (see the
    /// module rules). Stops at the first error (a refusal of the source's
    /// admission, say) with what was moved before it moved for good.
    pub async fn redrive(self: &Arc<Self>, max_messages: Option<u64>, reason: Option<&str>) -> Result<Redriven> {
        let Some(dead) = self.dead_letter.clone() else {
            return Err(BrokerError::FailedPrecondition(format!("queue {} has no dead-letter queue", self.name)));
        };
        let mut done = Redriven::default();
        let (count_max, size_max) = self.batch_bounds();
        let wanted = |done: &Redriven| max_messages.is_none_or(|max| done.moved + done.already_moved < max);
        for lane in 0..dead.lane_count() {
            let log = &dead.lanes[lane as usize];
            let durable = dead.durable[lane as usize].load(Ordering::Acquire);
            let mut cursor = log.cursor(log.stats().ack_floor);
            let mut batch: Vec<Candidate> = Vec::new();
            let mut batch_size = 0;
            while wanted(&done) {
                let Some(read) = cursor.next() else { break };
                let Ok(record) = read else { continue };
                if record.offset >= durable {
                    break;
                }
                let header = |name: &str| record.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
                if reason.is_some_and(|r| header(HEADER_DEAD_LETTER_REASON) != Some(r)) {
                    continue;
                }
                if dead.is_leased(lane, record.offset) {
                    done.skipped_leased += 1;
                    continue;
                }
                let candidate = self.candidate(lane, record);
                if !batch.is_empty() && batch_size + candidate.size > size_max {
                    self.move_batch(&dead, std::mem::take(&mut batch), &mut done).await?;
                    batch_size = 0;
                }
                batch_size += candidate.size;
                batch.push(candidate);
                let room = max_messages.map_or(u64::MAX, |max| max - done.moved - done.already_moved);
                if batch.len() >= count_max || batch.len() as u64 >= room {
                    self.move_batch(&dead, std::mem::take(&mut batch), &mut done).await?;
                    batch_size = 0;
                }
            }
            self.move_batch(&dead, batch, &mut done).await?;
        }
        Ok(done)
    }

    /// Most messages and stored bytes per batch: [`REDRIVE_BATCH_COUNT`],
    /// and within the smallest lane share of the limits (so admission never
    /// refuses a batch for its size alone); at least one message.
    fn batch_bounds(&self) -> (usize, u64) {
        let settings = self.settings();
        let share = settings.lane_admission.iter().copied().fold(1.0, f64::min);
        let messages = (settings.max_messages as f64 * share).floor() as usize;
        let bytes = (settings.max_bytes as f64 * share).floor() as u64;
        (REDRIVE_BATCH_COUNT.min(messages).max(1), bytes)
    }

    /// The source-queue copy of a dead letter at `lane` of the dead-letter
    /// queue.
    fn candidate(&self, lane: u32, record: Record) -> Candidate {
        let settings = self.settings();
        let source_lane = record
            .headers
            .iter()
            .find(|(k, _)| k == HEADER_SOURCE_LANE)
            .and_then(|(_, name)| settings.lanes.iter().position(|l| l == name))
            .map_or(lane.min(settings.lane_count() - 1), |i| u32::try_from(i).expect("at most LANES_MAX lanes"));
        let size = record.stored_size();
        let key = Bytes::from(format!("ballast-redrive:{lane}:{}", record.offset));
        let headers = record.headers.into_iter().filter(|(k, _)| !k.starts_with("ballast-")).collect();
        let copy = Publish {
            payload: record.payload,
            headers,
            key: Some(key),
            lane: Some(source_lane),
            delay_ms: 0,
            ttl_ms: 0,
        };
        Candidate { lane, offset: record.offset, size, copy }
    }

    /// Stores the copies (answered once durable), then acks their dead
    /// letters and waits until those acks are durable too.
    async fn move_batch(self: &Arc<Self>, dead: &Queue, batch: Vec<Candidate>, done: &mut Redriven) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (places, copies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|c| ((c.lane, c.offset, c.size), c.copy)).unzip();
        let receipts = self.publish(copies).await?;
        let mut commits = Vec::new();
        for ((lane, offset, size), receipt) in places.into_iter().zip(receipts) {
            // Under the delivery lock: not leased now, and not leased before
            // the ack lands (a dispatch needs the lock).
            let state = dead.delivery.lock();
            if state.holds_offset(lane, offset) {
                done.skipped_leased += 1;
                continue;
            }
            commits.extend(dead.ack_record(lane, offset, size, AckKind::Acked)?);
            drop(state);
            if receipt.duplicate {
                done.already_moved += 1;
            } else {
                done.moved += 1;
                self.lane_metrics(receipt.lane as usize).redriven.increment(1);
            }
        }
        for commit in commits {
            commit.await?;
        }
        Ok(())
    }
}
