//! [`Saturation`] (how full a queue or lane is and how fast it moves), the
//! snapshot types [`BrokerStats`], [`QueueStats`] and [`LaneStats`], and
//! [`StatsWatch`], the stream of snapshots behind [`Admin::watch_stats`].
//!
//! The same figures arrive three ways: in every publish receipt
//! ([`Receipt::queue_saturation`], [`Receipt::lane_saturation`]), in
//! [`Admin::stats`], and pushed at an interval by [`Admin::watch_stats`].
//!
//! [`Admin::stats`]: crate::Admin::stats
//! [`Admin::watch_stats`]: crate::Admin::watch_stats
//! [`Receipt::queue_saturation`]: crate::Receipt::queue_saturation
//! [`Receipt::lane_saturation`]: crate::Receipt::lane_saturation

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ballast_proto::v1 as proto;
use tokio_stream::Stream;
use tonic::Streaming;

use crate::Error;

/// How saturated a queue or one of its lanes is, as the broker measured it.
///
/// `saturation` is the larger of `depth / max_messages` and
/// `bytes / max_bytes`, from 0 to 1 (above 1 only if the limits were lowered
/// below the backlog). A lane's figure is measured against the *queue's*
/// limits, so lanes compare directly and add up to the queue's.
///
/// Admission compares the queue's figure (all lanes together) with the
/// publishing lane's threshold ([`QueueSettings::lane_admission`]; by
/// default 1.0, 0.9 and 0.7 for high, normal and low): a publish to the low
/// lane is refused once the queue is 70% full. So a producer that wants to
/// slow down before it is refused watches [`Receipt::queue_saturation`]
/// against its lane's threshold; see [`Receipt`] for an example.
///
/// [`QueueSettings::lane_admission`]: crate::QueueSettings::lane_admission
/// [`Receipt::queue_saturation`]: crate::Receipt::queue_saturation
/// [`Receipt`]: crate::Receipt
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct Saturation {
    /// Messages not yet acked, in-flight deliveries included.
    pub depth: u64,
    /// Stored bytes of the records not yet acked (record header, key,
    /// headers and payload, padded to 8 bytes); 0 when `depth` is 0.
    pub bytes: u64,
    /// `max(depth / max_messages, bytes / max_bytes)`: 0 is empty, 1 is full.
    pub saturation: f64,
    /// Age of the oldest message not yet acked; zero when empty.
    pub oldest_age: Duration,
    /// Time to drain `depth` at the recent ack rate (`depth / ack_rate`).
    /// `None` means unknown: messages are waiting and nothing was acked
    /// recently, so no consumer is keeping up (possibly none at all).
    pub drain_estimate: Option<Duration>,
    /// Smoothed ack (consume) rate, messages per second.
    pub ack_rate: f64,
    /// Smoothed publish rate, messages per second.
    pub publish_rate: f64,
}

impl Saturation {
    pub(crate) fn from_proto(figures: proto::Saturation) -> Saturation {
        Saturation {
            depth: figures.depth,
            bytes: figures.bytes,
            saturation: figures.saturation,
            oldest_age: Duration::from_millis(figures.oldest_age_ms),
            drain_estimate: figures.drain_estimate_ms.map(Duration::from_millis),
            ack_rate: figures.ack_rate,
            publish_rate: figures.publish_rate,
        }
    }

    /// Required figures: a stats answer without them breaks the protocol.
    /// `what` names the owner, formatted only for the error.
    fn required(figures: Option<proto::Saturation>, what: impl FnOnce() -> String) -> Result<Saturation, Error> {
        figures
            .map(Saturation::from_proto)
            .ok_or_else(|| Error::Protocol { message: format!("stats for {} came without saturation figures", what()) })
    }
}

/// The broker's figures at one instant: every queue asked for, and the disk.
///
/// ```no_run
/// # async fn example(admin: ballast_client::Admin) -> Result<(), ballast_client::Error> {
/// let stats = admin.stats(None).await?;
/// for queue in &stats.queues {
///     println!("{}: {} messages, {:.0}% full", queue.name, queue.saturation.depth, queue.saturation.saturation * 100.0);
/// }
/// if let Some(payments) = stats.queue("payments") {
///     println!("payments drains in {:?}", payments.saturation.drain_estimate);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// When the broker took the figures.
    pub at: SystemTime,
    /// One entry per queue (dead-letter queues included when every queue was
    /// asked for), sorted by name.
    pub queues: Vec<QueueStats>,
    /// Free bytes on the filesystem of the broker's data directory.
    pub disk_free_bytes: u64,
    /// The broker refuses every publish while `disk_free_bytes` is below
    /// this floor.
    pub disk_free_min_bytes: u64,
    /// The node's place in its cluster; `None` for a node without one.
    pub cluster: Option<ClusterStatus>,
}

/// The cluster log as one node sees it (`docs/replication.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStatus {
    pub node_id: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    pub term: u64,
    /// The leader's id and address; `None` during an election.
    pub leader: Option<(u64, String)>,
    /// Index of the last entry of this node's cluster log.
    pub last_log_index: u64,
    /// Index of the last entry committed and applied on this node.
    pub last_applied: u64,
    /// On the leader: each voter's id, matched index and lag in entries.
    pub peers: Vec<(u64, u64, u64)>,
}

impl ClusterStatus {
    fn from_proto(status: proto::ClusterStatus) -> ClusterStatus {
        ClusterStatus {
            node_id: status.node_id,
            role: status.role,
            term: status.term,
            leader: (status.leader_id != 0).then_some((status.leader_id, status.leader_addr)),
            last_log_index: status.last_log_index,
            last_applied: status.last_applied,
            peers: status.peers.into_iter().map(|p| (p.node_id, p.matched_index, p.lag)).collect(),
        }
    }
}

impl BrokerStats {
    /// The figures of queue `name`, if they are in this snapshot.
    pub fn queue(&self, name: &str) -> Option<&QueueStats> {
        self.queues.iter().find(|queue| queue.name == name)
    }

    pub(crate) fn from_proto(stats: proto::StatsResponse) -> Result<BrokerStats, Error> {
        Ok(BrokerStats {
            at: UNIX_EPOCH + Duration::from_millis(stats.at_ms),
            queues: stats.queues.into_iter().map(QueueStats::from_proto).collect::<Result<_, _>>()?,
            disk_free_bytes: stats.disk_free_bytes,
            disk_free_min_bytes: stats.disk_free_min_bytes,
            cluster: stats.cluster.map(ClusterStatus::from_proto),
        })
    }
}

/// One queue's figures, as a whole and per lane.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueStats {
    /// The queue's name.
    pub name: String,
    /// The queue as a whole (all lanes together).
    pub saturation: Saturation,
    /// Per lane, highest priority first.
    pub lanes: Vec<LaneStats>,
    /// Deliveries leased to consumers and not yet acked or nacked.
    pub in_flight: u64,
    /// Consumers subscribed.
    pub consumers: u32,
    /// Credit the consumers hold: deliveries they may still receive without
    /// granting more.
    pub credit: u64,
    /// The queue's admission limit on messages (`QueueSettings::max_messages`).
    pub max_messages: u64,
    /// The queue's admission limit on bytes (`QueueSettings::max_bytes`).
    pub max_bytes: u64,
    /// Publishes refused because the queue was too full for their lane,
    /// since the broker started.
    pub refused_queue_full: u64,
    /// Publishes refused because the disk was nearly full, since the broker
    /// started.
    pub refused_disk_full: u64,
    /// Publishes refused because their turn under the queue's publish
    /// quota was too far away, since the broker started.
    pub refused_publish_rate: u64,
    /// Publish calls that waited for their turn under the queue's publish
    /// quota, and how long all those waits add up to, since the broker
    /// started.
    pub throttled_calls: u64,
    pub throttled: Duration,
    /// Messages past their time to live, never delivered, since the broker
    /// started: stored in the dead-letter queue (reason `expired`), and
    /// dropped.
    pub expired_dead_lettered: u64,
    pub expired_dropped: u64,
    /// Delivery is held back by the queue's `max_delivery_rate` now: the
    /// consumers have credit and messages wait for the pace.
    pub paced: bool,
    /// Time delivery was held back by the pace since the broker started.
    pub paced_time: Duration,
    /// While paced: deliveries the consumers could take now that the pace
    /// holds back (the backlog it keeps); 0 when not paced.
    pub paced_held_back: u64,
}

impl QueueStats {
    /// The figures of the lane named `name`.
    pub fn lane(&self, name: &str) -> Option<&LaneStats> {
        self.lanes.iter().find(|lane| lane.name == name)
    }

    fn from_proto(stats: proto::QueueStats) -> Result<QueueStats, Error> {
        let saturation = Saturation::required(stats.saturation, || format!("queue {}", stats.name))?;
        let lanes = stats
            .lanes
            .into_iter()
            .map(|lane| {
                Ok(LaneStats {
                    saturation: Saturation::required(lane.saturation, || {
                        format!("lane {} of queue {}", lane.name, stats.name)
                    })?,
                    name: lane.name,
                    admission: lane.admission,
                    in_flight: lane.in_flight,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(QueueStats {
            name: stats.name,
            saturation,
            lanes,
            in_flight: stats.in_flight,
            consumers: stats.consumers,
            credit: stats.credit,
            max_messages: stats.max_messages,
            max_bytes: stats.max_bytes,
            refused_queue_full: stats.refused_queue_full,
            refused_disk_full: stats.refused_disk_full,
            refused_publish_rate: stats.refused_publish_rate,
            throttled_calls: stats.throttled_calls,
            throttled: Duration::from_millis(stats.throttled_ms),
            expired_dead_lettered: stats.expired_dead_lettered,
            expired_dropped: stats.expired_dropped,
            paced: stats.paced,
            paced_time: Duration::from_millis(stats.paced_ms),
            paced_held_back: stats.paced_held_back,
        })
    }
}

/// One lane's figures.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LaneStats {
    /// The lane's name.
    pub name: String,
    /// The lane's figures, measured against the queue's limits.
    pub saturation: Saturation,
    /// The lane's admission threshold: its publishes are admitted while they
    /// keep the queue (all lanes together) within this fraction of its
    /// limits, and refused beyond.
    pub admission: f64,
    /// Deliveries of this lane leased to consumers.
    pub in_flight: u64,
}

/// Stats snapshots pushed by the broker at a fixed interval
/// ([`Admin::watch_stats`](crate::Admin::watch_stats)): a [`Stream`] of
/// `Result<BrokerStats, Error>`, also readable with [`StatsWatch::next`]
/// without importing a stream extension trait.
///
/// The first snapshot arrives at once, then one per interval. The stream
/// runs until it is dropped, and ends (yields `None`) after the broker ends
/// it: after an error (the watched queue was deleted, the broker is shutting
/// down, the connection broke), which is yielded first. It does not
/// reconnect; call `watch_stats` again for that.
///
/// ```no_run
/// # async fn example(admin: ballast_client::Admin) -> Result<(), ballast_client::Error> {
/// use std::time::Duration;
///
/// let mut watch = admin.watch_stats(Some("payments"), Duration::from_secs(1)).await?;
/// while let Some(stats) = watch.next().await {
///     let stats = stats?;
///     if let Some(queue) = stats.queue("payments") {
///         println!("depth {} ({:.0}%)", queue.saturation.depth, queue.saturation.saturation * 100.0);
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[must_use = "a watch does nothing unless read"]
pub struct StatsWatch {
    /// `None` once the stream ended or yielded an error.
    inner: Option<Streaming<proto::StatsResponse>>,
}

impl StatsWatch {
    pub(crate) fn new(inner: Streaming<proto::StatsResponse>) -> StatsWatch {
        StatsWatch { inner: Some(inner) }
    }

    /// The next snapshot; `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<Result<BrokerStats, Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for StatsWatch {
    type Item = Result<BrokerStats, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let item = match Pin::new(inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => None,
            Poll::Ready(Some(Ok(stats))) => Some(BrokerStats::from_proto(stats)),
            Poll::Ready(Some(Err(status))) => Some(Err(Error::from_status(status))),
        };
        // After an error nothing more can come: end the stream (dropping the
        // call) so callers looping on it stop.
        if !matches!(item, Some(Ok(_))) {
            self.inner = None;
        }
        Poll::Ready(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(depth: u64) -> proto::Saturation {
        proto::Saturation {
            depth,
            bytes: depth * 100,
            saturation: depth as f64 / 50.0,
            oldest_age_ms: 1500,
            drain_estimate_ms: None,
            ack_rate: 0.0,
            publish_rate: 12.5,
        }
    }

    /// Wire figures become Rust types: milliseconds to durations, an unset
    /// drain estimate to `None` (unknown), never to zero.
    #[test]
    fn saturation_from_wire() {
        let saturation = Saturation::from_proto(figures(35));
        assert_eq!(saturation.depth, 35);
        assert_eq!(saturation.bytes, 3500);
        assert_eq!(saturation.saturation, 0.7);
        assert_eq!(saturation.oldest_age, Duration::from_millis(1500));
        assert_eq!(saturation.drain_estimate, None);
        assert_eq!(saturation.publish_rate, 12.5);
        let known = Saturation::from_proto(proto::Saturation { drain_estimate_ms: Some(0), ..figures(0) });
        assert_eq!(known.drain_estimate, Some(Duration::ZERO));
    }

    /// A snapshot converts with its queues and lanes; missing figures are a
    /// protocol violation naming what lacked them.
    #[test]
    fn snapshot_from_wire() {
        let lane = |name: &str, depth| proto::LaneStats {
            name: name.into(),
            saturation: Some(figures(depth)),
            admission: 0.7,
            in_flight: 1,
            storage_failed: false,
        };
        let queue = proto::QueueStats {
            name: "emails".into(),
            saturation: Some(figures(35)),
            lanes: vec![lane("high", 0), lane("low", 35)],
            in_flight: 1,
            consumers: 2,
            credit: 30,
            max_messages: 50,
            max_bytes: 1 << 30,
            refused_queue_full: 3,
            refused_disk_full: 0,
            refused_publish_rate: 4,
            throttled_calls: 5,
            throttled_ms: 1500,
            ..proto::QueueStats::default()
        };
        let response = proto::StatsResponse {
            at_ms: 1_700_000_000_000,
            queues: vec![queue.clone()],
            disk_free_bytes: 10,
            disk_free_min_bytes: 5,
            cluster: None,
        };
        let stats = BrokerStats::from_proto(response.clone()).expect("valid");
        assert_eq!(stats.at, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let emails = stats.queue("emails").expect("listed");
        assert_eq!(emails.saturation.depth, 35);
        assert_eq!(emails.lane("low").map(|lane| lane.saturation.depth), Some(35));
        assert_eq!((emails.consumers, emails.credit, emails.refused_queue_full), (2, 30, 3));
        assert_eq!((emails.refused_publish_rate, emails.throttled_calls), (4, 5));
        assert_eq!(emails.throttled, Duration::from_millis(1500));
        assert!(stats.queue("other").is_none());

        let mut broken = response;
        broken.queues[0].lanes[1].saturation = None;
        let error = BrokerStats::from_proto(broken).expect_err("no lane figures");
        assert!(
            matches!(&error, Error::Protocol { message } if message.contains("lane low of queue emails")),
            "{error}"
        );
    }
}
