//! Hard ceilings of the broker. Operator-tunable defaults live in
//! `config.rs` and are validated against these at startup.

use crate::queue::{
    HEADER_ATTEMPTS, HEADER_DEAD_LETTER_REASON, HEADER_NOT_BEFORE, HEADER_ORIGINAL_OFFSET, HEADER_SOURCE_LANE,
    HEADER_SOURCE_OFFSET, HEADER_SOURCE_QUEUE,
};

/// Ceiling of the `queues_max` setting (whose default, 10,000, lives in
/// `config.rs`): queues, dead-letter queues and damaged queues included,
/// that one broker holds. Past `queues_max` a creation is refused with
/// RESOURCE_EXHAUSTED. The ceiling keeps the all-queue answers (ListQueues,
/// GetStats and Watch without a queue) under the gRPC encode limit at their
/// usual size (a few hundred bytes per queue); an answer that would still
/// exceed it is cut at [`QUEUES_RESPONSE_SIZE_MAX`] (see there).
pub const QUEUES_MAX: usize = 50_000;

/// Encoded size, in bytes, past which an all-queue answer (ListQueues,
/// GetStats and Watch without a queue) stops adding queues: the queues
/// left out (the last ones by name) are counted in the log and can still be
/// asked for one by one. Below the gRPC encode limit by a margin for the
/// fixed fields, so such an answer never fails the call.
pub const QUEUES_RESPONSE_SIZE_MAX: usize = GRPC_ENCODE_SIZE_MAX - 64 * 1024;

/// glibc malloc arenas at most (`ballastd` sets it at start unless the
/// `MALLOC_ARENA_MAX` environment variable is set): one per core of the
/// 2-core machine the figures are from. Fewer arenas than threads keeps
/// thousands of queues' state on fewer, fuller pages.
pub const MALLOC_ARENAS_MAX: i32 = 2;

/// Ceiling of `queue_open_threads`: queues opened at once by the
/// background opener after a start, each on a blocking thread of its own.
/// Opening runs recovery (reads, and the first page faults of the maps), so
/// more threads than the disk can serve buy nothing. (A call to a queue not
/// open yet opens it at once, outside this count.)
pub const QUEUE_OPEN_THREADS_MAX: usize = 16;

/// Lanes per queue. Lane indexes travel as `u32` but must stay below this.
pub const LANES_MAX: usize = 8;

/// Longest queue name, in bytes (the name regex is `[a-z0-9][a-z0-9._-]{0,127}`).
/// A dead-letter queue's name is its queue's plus `.dead`, so it may be 5
/// bytes longer: every name a user may create can have its dead-letter
/// queue.
pub const QUEUE_NAME_SIZE_MAX: usize = 128;

/// Suffix of a queue's dead-letter queue.
pub const DEAD_LETTER_SUFFIX: &str = ".dead";

/// Largest lane weight.
pub const LANE_WEIGHT_MAX: u32 = 1000;

/// Longest lane name, in bytes.
pub const LANE_NAME_SIZE_MAX: usize = 32;

/// Ceiling for a queue's `message_size_max` (16 MiB, the storage ceiling). A
/// bigger payload is refused with INVALID_ARGUMENT before touching storage.
pub const MESSAGE_SIZE_MAX: u32 = ballast_storage::limits::PAYLOAD_SIZE_MAX;

/// Messages in one PublishBatch. Bigger batches are refused with
/// INVALID_ARGUMENT; the client library splits batches to stay under it.
pub const BATCH_COUNT_MAX: usize = 1000;

/// Credit one consumer may hold, and so deliveries it may have in flight.
/// Bounds the broker's memory per consumer; more is INVALID_ARGUMENT.
pub const CREDIT_MAX: u32 = 10_000;

/// Consumers (streams and in-progress pulls) per queue; more is
/// RESOURCE_EXHAUSTED.
pub const CONSUMERS_MAX: usize = 1024;

/// Nacks of one consume stream being applied at once (each stores a
/// durable copy off the stream's loop). At the limit the stream's next
/// request waits, so a client that sends nacks faster than they apply (or
/// never reads its rejections) is slowed instead of growing the broker's
/// tasks without bound.
pub const STREAM_NACKS_IN_FLIGHT_MAX: usize = 1024;

/// How long a publish refused by admission (queue full, disk low) waits
/// before its answer, holding nothing (no publish slot, no idempotency
/// key, its messages dropped). A producer that ignores `retry-after-ms` and
/// retries at once is slowed to one call per this long per call in flight,
/// so that a flood of refused calls cannot take the node's CPU from the
/// other queues (a refusal costs about as much as a store: receiving and
/// decoding the request). Small against the smallest retry-after hint
/// (`RETRY_AFTER_MS_MIN`), which a well-behaved producer waits anyway.
pub const REFUSAL_HOLD_MS: u64 = 25;

/// Requests of one PublishStream published at once (read but not yet
/// answered). At the limit the broker stops reading the stream, and HTTP/2
/// flow control makes the sender wait: a producer never makes the broker
/// hold more than this many of its batches.
pub const PUBLISH_STREAM_IN_FLIGHT_MAX: usize = 64;

/// Payload bytes of one PublishStream's requests being published at once:
/// the broker stops reading at this many (so one stream holds at most this
/// plus one request, at most `GRPC_DECODE_SIZE_MAX`, in memory).
pub const PUBLISH_STREAM_IN_FLIGHT_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Longest Pull wait, in milliseconds.
pub const PULL_WAIT_MS_MAX: u64 = 60_000;

/// Room, in milliseconds, a Pull keeps between the end of its wait and the
/// server's `grpc.request_timeout_ms`, to lease and encode its answer: a
/// Pull waits at most `request_timeout_ms - PULL_ANSWER_MARGIN_MS` whatever
/// its `wait_ms`, so on a busy node its answer still starts before the
/// timeout cuts the call (which would strand what it leased until the
/// leases expire). Below `REQUEST_TIMEOUT_MS_MIN`.
pub const PULL_ANSWER_MARGIN_MS: u64 = 100;

/// Messages pulled and not yet acked, nacked or expired, per queue (plus
/// the `max_messages` of Pulls in progress): as many as one stream consumer
/// may hold. A Pull asking for more gets fewer; at the limit it is refused
/// with RESOURCE_EXHAUSTED until pulled messages are acked or nacked.
pub const PULL_LEASES_MAX: usize = CREDIT_MAX as usize;

/// Most messages one Peek returns; more is INVALID_ARGUMENT. A page of
/// browsing, not a dump: page on with the answer's `next`. Its size is
/// bounded like a Pull's too ([`PULL_RESPONSE_SIZE_MAX`]).
pub const PEEK_MESSAGES_MAX: u32 = 1000;

/// Most dead letters a redrive stores as one publish batch (then acks):
/// enough to amortize the sync, few enough that a kill mid-batch is cheap
/// to repeat. A batch is also kept within the source queue's smallest
/// lane share of `max_messages` and `max_bytes`, which admission would
/// refuse even on an empty queue.
pub const REDRIVE_BATCH_COUNT: usize = 100;

/// Largest Pull response, in encoded bytes. Deliveries past it are not
/// returned and go back to the front of their lanes unleased (no attempt
/// counted); the next Pull gets them. The first delivery is always
/// returned, so one message of the largest size fits, and the response
/// stays under the client's decode limit and the server's encode limit.
pub const PULL_RESPONSE_SIZE_MAX: usize = MESSAGE_SIZE_MAX as usize + 512 * 1024;

/// A message that cannot be read for delivery (an I/O error, not a CRC
/// failure) is kept and tried again after this long, in milliseconds.
pub const REREAD_RETRY_MS: u64 = 1_000;

/// Longest publish or nack delay, in milliseconds (7 days).
pub const DELAY_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// Ceiling of a queue's `message_ttl_ms` and of a message's `ttl_ms`, in
/// milliseconds (14 days, as long as SQS keeps a message). A longer one is
/// INVALID_ARGUMENT; 0 is no TTL.
pub const MESSAGE_TTL_MS_MAX: u64 = 14 * 24 * 3600 * 1000;

/// Expired messages of one queue on their way to its dead-letter queue at
/// once (read by dispatch, stored by tasks of the queue's timer). At the
/// limit the queue's lanes yield nothing more until some are stored, so a
/// backlog of expired messages costs bounded memory and tasks, and is
/// dead-lettered at the pace the dead-letter queue's group commit takes.
pub const EXPIRING_MAX: usize = 1024;

/// Ceiling of a queue's `max_delivery_rate`, deliveries per second (a
/// million: above any rate one queue's dispatch reaches, so a higher
/// setting would be no pace at all). More is INVALID_ARGUMENT; 0 is none.
pub const MAX_DELIVERY_RATE_MAX: u64 = 1_000_000;

/// How far ahead of now a queue's delivery pace may run, in milliseconds:
/// after an idle stretch the consumers may get this much of the rate at
/// once (at least one delivery), then exactly the rate. Small, so the rate
/// holds over any window a downstream cares about (100 ms of 200/s is 20
/// deliveries, 0.4% over 5 s).
pub const DELIVERY_PACE_BURST_MS: u64 = 100;

/// Longest lease, in milliseconds (12 hours).
pub const LEASE_TIMEOUT_MS_MAX: u64 = 12 * 3600 * 1000;

/// Smallest lease, in milliseconds.
pub const LEASE_TIMEOUT_MS_MIN: u64 = 10;

/// Most attempts a queue may allow before dead-lettering.
pub const MAX_ATTEMPTS_MAX: u32 = 1000;

/// Longest dedupe window, in milliseconds (7 days).
pub const DEDUPE_WINDOW_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// Idempotency keys remembered per queue. When full, the oldest key is
/// forgotten early (counted in the log), so memory stays bounded under any
/// key rate.
pub const DEDUPE_KEYS_MAX: usize = 1_000_000;

/// Messages read ahead whose delay has not expired, per lane. When full the
/// lane stops reading further until some come due, so memory stays bounded.
pub const DELAYED_MAX: usize = 100_000;

/// Headers per stored record and their encoded size (storage ceilings).
/// A publish gets less: [`PUBLISH_HEADERS_COUNT_MAX`] and
/// [`PUBLISH_HEADERS_SIZE_MAX`].
pub const HEADERS_COUNT_MAX: u32 = ballast_storage::limits::HEADERS_COUNT_MAX;
pub const HEADERS_SIZE_MAX: u32 = ballast_storage::limits::HEADERS_SIZE_MAX;

/// Longest nack reason, in bytes. The reason travels with the message as
/// its `ballast-dead-letter-reason` header, so it must fit the room a
/// publish leaves for the broker's headers ([`RESERVED_HEADERS_SIZE`]); a
/// longer one is refused with INVALID_ARGUMENT and the nack does nothing.
/// 1 KiB holds an error message; stack traces belong in the consumer's log.
pub const NACK_REASON_SIZE_MAX: usize = 1024;

/// Headers the broker may add to a stored copy of a message: the delay's
/// `ballast-not-before` and `ballast-original-offset` on a redelivery, and
/// on a dead letter the reason, source queue, lane and offset, attempts and
/// original offset. Counted once each, so the figure covers every copy.
pub const RESERVED_HEADERS_COUNT: u32 = 7;

/// Encoded size, in bytes, of the headers of [`RESERVED_HEADERS_COUNT`] at
/// their longest values (a `u64` in decimal is at most 20 digits, a `u32`
/// 10; names and reasons at their limits). A publish may use only the rest
/// of [`HEADERS_SIZE_MAX`], so that any message that was published can
/// always be redelivered and dead-lettered with all its headers.
pub const RESERVED_HEADERS_SIZE: u32 = reserved_header_size(HEADER_NOT_BEFORE, U64_DIGITS)
    + reserved_header_size(HEADER_ORIGINAL_OFFSET, U64_DIGITS)
    + reserved_header_size(HEADER_DEAD_LETTER_REASON, NACK_REASON_SIZE_MAX)
    + reserved_header_size(HEADER_SOURCE_QUEUE, QUEUE_NAME_SIZE_MAX)
    + reserved_header_size(HEADER_SOURCE_LANE, LANE_NAME_SIZE_MAX)
    + reserved_header_size(HEADER_SOURCE_OFFSET, U64_DIGITS)
    + reserved_header_size(HEADER_ATTEMPTS, U32_DIGITS);

/// Headers one published message may carry (64 less the
/// [`RESERVED_HEADERS_COUNT`] the broker keeps for itself). More is
/// INVALID_ARGUMENT.
pub const PUBLISH_HEADERS_COUNT_MAX: u32 = HEADERS_COUNT_MAX - RESERVED_HEADERS_COUNT;

/// Encoded size, in bytes, of one published message's headers (64 KiB less
/// [`RESERVED_HEADERS_SIZE`]); each header is its name and value plus 6
/// bytes. More is INVALID_ARGUMENT.
pub const PUBLISH_HEADERS_SIZE_MAX: u32 = HEADERS_SIZE_MAX - RESERVED_HEADERS_SIZE;

/// Longest decimal `u64` and `u32`.
const U64_DIGITS: usize = 20;
const U32_DIGITS: usize = 10;

/// Encoded size of one header (a 2-byte name length, the name, a 4-byte
/// value length, the value), as `ballast_storage::record::headers_size`
/// counts it.
const fn reserved_header_size(name: &str, value_size_max: usize) -> u32 {
    (2 + name.len() + 4 + value_size_max) as u32
}

/// Longest idempotency key, in bytes.
pub const KEY_SIZE_MAX: u32 = ballast_storage::limits::KEY_SIZE_MAX;

/// gRPC decode limit: the largest batch of largest messages plus framing is
/// far above this, so it is set from the message limit instead: one
/// maximum-size message plus 1 MiB of headers and framing, or a batch of
/// small ones.
pub const GRPC_DECODE_SIZE_MAX: usize = MESSAGE_SIZE_MAX as usize + 1024 * 1024;

/// gRPC encode limit: the largest response the broker sends (the client
/// library decodes up to the same 17 MiB). A response over it fails the
/// call with RESOURCE_EXHAUSTED instead of reaching a client that would
/// refuse it; Pull keeps under it by [`PULL_RESPONSE_SIZE_MAX`].
pub const GRPC_ENCODE_SIZE_MAX: usize = GRPC_DECODE_SIZE_MAX;

/// Request metadata (gRPC headers) a call may carry, in bytes counted as
/// HTTP/2 does (name + value + 32 per entry). More is refused with
/// RESOURCE_EXHAUSTED naming the size and this limit, before the call runs.
pub const METADATA_SIZE_MAX: usize = 64 * 1024;

/// HTTP/2 header list the server accepts, in bytes: above
/// [`METADATA_SIZE_MAX`] so that oversized metadata reaches the broker's
/// own check (a gRPC status) instead of HTTP/2's (an HTTP 431, which
/// clients report as UNKNOWN). Only a header list above this gets 431.
pub const HTTP2_HEADER_LIST_SIZE_MAX: u32 = 1024 * 1024;

/// Ceilings of the `[grpc]` settings in `config.rs` (whose defaults live
/// there). Connections the server holds at once: past `grpc.connections_max`
/// a new connection is closed at once and logged.
pub const CONNECTIONS_MAX: usize = 65_536;
/// Concurrent HTTP/2 streams (calls) per connection: past
/// `grpc.streams_per_connection_max` the client's HTTP/2 layer waits for a
/// stream to end before it starts another call.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 65_536;
/// Ceiling of `grpc.publish_slots`: publish calls doing their CPU work at
/// once across the node (`fair.rs`). More slots than workers only lets one
/// queue's calls queue on the workers again.
pub const PUBLISH_SLOTS_MAX: usize = 1024;
/// Stats Watch streams open at once: past `grpc.watch_streams_max` a Watch
/// is refused with RESOURCE_EXHAUSTED.
pub const WATCH_STREAMS_MAX: usize = 65_536;
/// Shortest HTTP/2 and TCP keepalive settings, in milliseconds: pings more
/// often than this would be load, not liveness checks.
pub const KEEPALIVE_MS_MIN: u64 = 100;
/// Longest HTTP/2 and TCP keepalive settings, in milliseconds (1 day).
pub const KEEPALIVE_MS_MAX: u64 = 24 * 3600 * 1000;

/// Shortest `grpc.request_timeout_ms`, in milliseconds: a publish must
/// have time for a sync on a slow disk.
pub const REQUEST_TIMEOUT_MS_MIN: u64 = 1000;
/// Longest `grpc.request_timeout_ms`, in milliseconds (1 hour).
pub const REQUEST_TIMEOUT_MS_MAX: u64 = 3600 * 1000;

/// Descriptors left, at the least, for what is not a log file
/// (connections, directories, the metrics endpoint) when the storage's
/// open-file cache is fitted under the process's limit
/// (`server::fit_open_files`): a quarter of the limit, and never fewer.
pub const OPEN_FILES_RESERVE_MIN: u64 = 64;

/// Header names starting with this are reserved for the broker.
pub const RESERVED_HEADER_PREFIX: &str = "ballast-";

const _: () = assert!(PULL_ANSWER_MARGIN_MS < REQUEST_TIMEOUT_MS_MIN);
const _: () = assert!(LANES_MAX <= u8::MAX as usize);
const _: () = assert!(RESERVED_HEADERS_SIZE < HEADERS_SIZE_MAX / 16);
const _: () = assert!(RESERVED_HEADERS_COUNT < HEADERS_COUNT_MAX / 4);
// One delivery of the largest message (payload, headers, key and a few
// fixed fields) fits in a Pull response, and a full response in a frame.
const _: () = assert!(
    MESSAGE_SIZE_MAX as usize + 2 * HEADERS_SIZE_MAX as usize + KEY_SIZE_MAX as usize + 1024 <= PULL_RESPONSE_SIZE_MAX
);
const _: () = assert!(PULL_RESPONSE_SIZE_MAX + 1024 <= GRPC_ENCODE_SIZE_MAX);
const _: () = assert!(METADATA_SIZE_MAX < HTTP2_HEADER_LIST_SIZE_MAX as usize);
const _: () = assert!(QUEUE_NAME_SIZE_MAX > DEAD_LETTER_SUFFIX.len());
const _: () = assert!(QUEUES_RESPONSE_SIZE_MAX > 1024 * 1024);

/// Default admission limit on a queue's unacked messages.
pub const MAX_MESSAGES_DEFAULT: u64 = 1_000_000;
/// Largest `max_messages` a queue may set.
pub const MAX_MESSAGES_MAX: u64 = 1_000_000_000_000;
/// Default admission limit on a queue's bytes on disk (1 GiB).
pub const MAX_BYTES_DEFAULT: u64 = 1 << 30;
/// Smallest and largest `max_bytes` a queue may set (64 KiB .. 1 PiB).
pub const MAX_BYTES_MIN: u64 = 64 * 1024;
pub const MAX_BYTES_MAX: u64 = 1 << 50;

/// Bounds of a refusal's retry-after hint, in milliseconds.
pub const RETRY_AFTER_MS_MIN: u64 = 100;
pub const RETRY_AFTER_MS_MAX: u64 = 30_000;
/// Retry-after hint when nothing is consuming (no drain rate to go by).
pub const RETRY_AFTER_MS_UNKNOWN: u64 = 1_000;

/// How often rates, disk free space and gauges are refreshed, in ms.
pub const STATS_TICK_MS: u64 = 1_000;
/// Smoothing of the publish and ack rates: weight of the newest tick.
pub const RATE_SMOOTHING: f64 = 0.3;
/// Stats Watch interval bounds and default, in milliseconds.
pub const WATCH_INTERVAL_MS_MIN: u64 = 100;
pub const WATCH_INTERVAL_MS_MAX: u64 = 60_000;
pub const WATCH_INTERVAL_MS_DEFAULT: u64 = 1_000;

/// Publish quotas (`max_publish_rate`, `max_publish_byte_rate`): how far
/// ahead of its quota a queue's producers may run before calls wait, in
/// milliseconds of quota. Small, so that a flood is spread out rather than
/// let through in bursts that other queues would feel.
pub const QUOTA_BURST_MS: u64 = 100;
/// Longest a publish waits for its turn under its queue's quota, in
/// milliseconds, scaled by its lane's admission fraction (low waits at most
/// 0.7 s by default). A call whose turn is further away is refused with
/// RESOURCE_EXHAUSTED once it has waited this long, so producers that
/// ignore retry-after are held to a few calls per second each.
pub const PUBLISH_THROTTLE_WAIT_MS_MAX: u64 = 1_000;

/// Retry-after hint, in milliseconds, of a publish refused by a real
/// ENOSPC from the disk (`ballast-reason: disk_full`): space rarely
/// returns sooner, and the disk watermark (`disk_free_min_bytes`) usually
/// refuses first.
pub const DISK_FULL_RETRY_AFTER_MS: u64 = 1_000;

/// Retry-after hint, in milliseconds, of a call refused with UNAVAILABLE
/// because its queue's log failed a write or sync and is being reopened.
pub const STORAGE_RECOVERY_RETRY_AFTER_MS: u64 = 1_000;

/// First pause, in milliseconds, before the broker reopens a lane's log
/// that a failed write or sync poisoned; it doubles after each failed
/// reopen up to [`LANE_REOPEN_BACKOFF_MS_MAX`], so a dead disk costs one
/// recovery attempt per that long, not a busy loop.
pub const LANE_REOPEN_BACKOFF_MS_MIN: u64 = 1_000;

/// Longest pause, in milliseconds, between two reopen attempts of a
/// poisoned lane.
pub const LANE_REOPEN_BACKOFF_MS_MAX: u64 = 30_000;

/// Failed authentications one peer address may make in one window of
/// [`AUTH_FAILURE_WINDOW_MS`]; past it the address's calls (health checks
/// aside) are refused with RESOURCE_EXHAUSTED and a retry-after hint until
/// the window ends, before their credentials are checked, so guessing
/// tokens runs at most this many guesses per window and address.
pub const AUTH_FAILURES_MAX: u32 = 10;

/// The window, in ms, over which [`AUTH_FAILURES_MAX`] counts.
pub const AUTH_FAILURE_WINDOW_MS: u64 = 10_000;

/// Peer addresses the failed-authentication table tracks at once; a new one
/// past it replaces the address whose window started first, so the table
/// stays a few hundred KiB whatever the number of peers.
pub const AUTH_FAILURE_PEERS_MAX: usize = 4096;

/// How often the auth file's modification time and size are checked for a
/// change, in ms (SIGHUP reloads at once).
pub const AUTH_RELOAD_POLL_MS: u64 = 1_000;

/// Longest time, in ms, from accepting a connection on a TLS listener to
/// the end of its TLS handshake. Past it the connection is closed (logged,
/// counted in `ballast_tls_handshake_failures_total`) and its connection
/// permit freed. Handshakes run in tasks of their own, so a slow or silent
/// client never holds up the accept loop; this bounds how long it holds a
/// permit (and its few KiB of TLS state) without having said anything.
/// Ten seconds leave room for a slow network's round trips.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Interval, in ms, at which the TLS certificate, key and client CA files'
/// modification times and sizes are checked; a change reloads them (as
/// SIGHUP does). A few seconds keep a rotation prompt at the cost of three
/// `stat` calls per poll.
pub const TLS_RELOAD_POLL_MS: u64 = 2_000;

/// Largest TLS certificate, key or client CA file, in bytes, the broker
/// reads. A bigger one is refused at start (and on reload) as probably the
/// wrong file; 1 MiB holds thousands of PEM certificates.
pub const TLS_FILE_SIZE_MAX: u64 = 1024 * 1024;

/// Connections whose TLS handshake finished but that the HTTP/2 server has
/// not taken yet. The server takes them as fast as it can; past this,
/// finished handshakes wait (holding their connection permits), which
/// bounds the queue while the connection limit bounds the handshakes.
pub const TLS_HANDSHAKES_PENDING_MAX: usize = 64;

/// TLS handshakes the metrics listener (with `[metrics] tls`) runs at once;
/// a connection past it is closed at once (and logged). Scrapers are few;
/// this bounds what strangers can make the endpoint hold.
pub const METRICS_TLS_HANDSHAKES_MAX: usize = 64;

/// Longest time, in ms, a connection whose TLS handshake failed is kept to
/// close it gracefully: the broker's side is shut down (after the TLS
/// alert) and what the client still sends is read and dropped, so that the
/// client reads the alert (a plaintext client then reports a TLS listener)
/// instead of a reset. The connection keeps its permit meanwhile; a quarter
/// second covers a loopback or LAN round trip.
pub const TLS_FAILED_LINGER_MS: u64 = 250;

const _: () =
    assert!(REFUSAL_HOLD_MS < RETRY_AFTER_MS_MIN, "a refusal's hold stays below the smallest retry-after hint");

/// Samples kept in a queue's console history ring: one per stats tick
/// ([`STATS_TICK_MS`]), so 300 is the last five minutes. The oldest sample
/// is dropped when a new one would pass it. A sample is a few dozen bytes
/// plus one `u64` depth per lane.
pub const HISTORY_SAMPLES_MAX: usize = 300;

/// Queues whose history the console keeps at once. A queue's history is
/// sampled only while someone reads it (`GET /api/v1/queues/{name}`), so
/// nobody looking costs nothing; past this many queues read within
/// [`HISTORY_IDLE_MS`], the history read longest ago is dropped to make
/// room. 64 rings of 300 samples of a 3-lane queue (about 130 bytes a
/// sample with its allocation) are about 2.4 MiB.
pub const HISTORY_QUEUES_MAX: usize = 64;

/// A queue's history ring is dropped (and no longer sampled) when nobody
/// has read it for this long, in ms: ten minutes, so a console tab left in
/// the background for a while still shows the minutes before it returns.
pub const HISTORY_IDLE_MS: u64 = 600_000;

/// KEDA external scaler `StreamIsActive` streams open at once (KEDA opens
/// one per ScaledObject that uses the scaler): past it a new stream is
/// refused with RESOURCE_EXHAUSTED. Each holds a task and a small
/// channel; 1,024 is far more ScaledObjects than one broker serves.
pub const SCALER_STREAMS_MAX: usize = 1_024;

/// How often, in ms, a `StreamIsActive` stream looks at its queue; it
/// sends only when the answer changes (and once at the start). One stats
/// tick, the rate at which the figures behind it move.
pub const SCALER_STREAM_CHECK_MS: u64 = STATS_TICK_MS;

/// The scaler's target when a ScaledObject gives no `targetValue`, for
/// `metric: depth`: messages of backlog per consumer replica.
pub const SCALER_TARGET_DEPTH_DEFAULT: f64 = 100.0;

/// The scaler's target when a ScaledObject gives no `targetValue`, for
/// `metric: drainSeconds`: the drain time, in seconds, the consumers
/// should keep the backlog under.
pub const SCALER_TARGET_DRAIN_SECONDS_DEFAULT: f64 = 60.0;

/// Ceiling of a queue's `replicas`: the largest cluster a replicated queue
/// spans (Raft voters; an odd count, so a majority is always one more
/// than a minority).
pub const REPLICAS_MAX: u32 = 7;

/// `retry-after-ms` of an UNAVAILABLE for a replicated queue on a node
/// that is not the leader, or during an election: about a heartbeat, so a
/// client that cannot follow `ballast-leader` retries soon after the new
/// leader is known.
pub const NOT_LEADER_RETRY_AFTER_MS: u64 = 200;

/// Acks of replicated queues gathered into one cluster log entry at most
/// (the proposer takes what is waiting, up to this many, per entry).
pub const CLUSTER_ACK_BATCH_MAX: usize = 4096;

/// Acks of replicated queues queued for the cluster log at once; past it,
/// each further ack waits in a task of its own for room.
pub const CLUSTER_ACKS_QUEUED_MAX: usize = 65_536;

/// Entries of the cluster log kept behind a snapshot before openraft
/// purges them: a follower that falls further behind than this (down for
/// long) needs a re-seed in this version (docs/replication.md).
pub const CLUSTER_LOG_KEEP: u64 = 100_000;

/// How often each node writes its cluster sync point, snapshots and lets
/// openraft purge its cluster log (ms).
pub const CLUSTER_SYNC_INTERVAL_MS: u64 = 1_000;

/// Size, in bytes, past which the Raft log (`cluster::log_store`) starts a
/// new segment file. Purging the log deletes whole segments, so this is
/// also the granularity of the disk space a purge gives back; 64 MiB keeps
/// the file count small at a few thousand entries per second.
pub const RAFT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;

/// Largest encoded Raft log entry, in bytes: one `Append` of the largest
/// publish (a batch within the gRPC decode limit) plus 1 MiB for the
/// command's own fields. A bigger entry is refused by the log store (its
/// proposer must split it), and a frame header claiming more is corruption.
pub const RAFT_ENTRY_SIZE_MAX: u32 = GRPC_DECODE_SIZE_MAX as u32 + 1024 * 1024;

/// Bytes of recent Raft log entries the log store keeps decoded in memory
/// (besides those not yet written, which it always keeps): replication to
/// a follower that keeps up reads from here instead of the disk.
pub const RAFT_LOG_CACHE_SIZE: u64 = 32 * 1024 * 1024;

/// Writes queued for the Raft log's writer thread (appends, truncations,
/// purges, votes): past this many, openraft waits for the writer. Also the
/// most jobs the writer takes into one group commit.
pub const RAFT_LOG_WRITER_QUEUE_MAX: usize = 256;

/// Milliseconds the Raft log store's `open` waits for its directory's
/// lock: a store of this process dropped just before (a restart of the
/// cluster node) releases it once its writer thread has finished the
/// writes queued to it. Past this the open fails (another store still
/// has the directory).
pub const RAFT_LOG_LOCK_WAIT_MS: u64 = 5_000;

/// Largest message of the internal `ballast.cluster.v1.Raft` service, in
/// bytes, both ways: one largest entry plus 1 MiB of request fields.
/// Replication reads at most [`RAFT_ENTRY_SIZE_MAX`] bytes of entries per
/// AppendEntries, so one always fits; one over it anyway is split
/// (openraft resends fewer entries) before it is sent.
pub const RAFT_MESSAGE_SIZE_MAX: usize = RAFT_ENTRY_SIZE_MAX as usize + 1024 * 1024;

const _: () = assert!(RAFT_ENTRY_SIZE_MAX as u64 + 8 <= RAFT_SEGMENT_SIZE);
