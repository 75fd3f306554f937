//! Hard ceilings and defaults of the storage engine, in one place.
//!
//! Operator-tunable values (segment size, sync policy, dedupe window) have
//! their defaults here and are validated against these ceilings by
//! [`LogOptions::validate`](crate::LogOptions::validate).

/// Size, in bytes, of the header at the start of every segment file (magic,
/// format version, base offset, segment size, CRC). Records start right after.
pub const SEGMENT_HEADER_SIZE: u64 = 64;

/// Size, in bytes, of the fixed part of every record (length, CRC, offset,
/// timestamp, attempt, flags, key/headers/payload lengths).
pub const RECORD_HEADER_SIZE: u32 = 40;

/// Every record starts at a multiple of this many bytes. Alignment makes the
/// resynchronisation scan after a corrupted record 8x cheaper and keeps
/// headers from straddling cache lines more often than needed.
pub const RECORD_ALIGN: u64 = 8;

/// Default maximum size, in bytes, of one segment file (64 MiB). A segment
/// file grows to it in steps (`SEGMENT_GROWTH_STEP_MIN`, doubling) as its
/// records need the space.
pub const SEGMENT_SIZE_DEFAULT: u64 = 64 * 1024 * 1024;

/// Smallest allowed segment size (64 KiB): small segments are for tests; a
/// segment must still hold at least one maximum-size record.
pub const SEGMENT_SIZE_MIN: u64 = 64 * 1024;

/// Largest allowed segment size (1 GiB). Positions inside a segment are kept
/// as `u32` in the sparse index, so this must stay below 4 GiB.
pub const SEGMENT_SIZE_MAX: u64 = 1024 * 1024 * 1024;

/// First preallocation step of a segment file, in bytes (64 KiB): a new
/// segment is created with this much (or the first step that holds its first
/// records), and grows by doubling, up to the segment size, before the writer
/// needs the space. So an empty log holds 64 KiB of segment, and a segment
/// grows at most log2(segment size / 64 KiB) times (10 for 64 MiB). When
/// growth fails (a full disk) the append is refused with `DiskFull`, nothing
/// written.
pub const SEGMENT_GROWTH_STEP_MIN: u64 = 64 * 1024;

/// Ceiling, in bytes, for one record's payload (16 MiB). The broker's
/// per-queue `message_size_max` (default 1 MiB) must not exceed it.
pub const PAYLOAD_SIZE_MAX: u32 = 16 * 1024 * 1024;

/// Ceiling, in bytes, for an idempotency key. Longer keys are refused with
/// [`AppendError::KeyTooLarge`](crate::AppendError::KeyTooLarge); they are
/// kept in memory for the dedupe window, so they must stay small.
pub const KEY_SIZE_MAX: u32 = 256;

/// Ceiling for the number of headers on one record.
pub const HEADERS_COUNT_MAX: u32 = 64;

/// Ceiling, in bytes, for the encoded headers block of one record (64 KiB).
pub const HEADERS_SIZE_MAX: u32 = 64 * 1024;

/// Ceiling for the number of records in one `append` call. Bigger batches are
/// refused with [`AppendError::BatchTooLarge`](crate::AppendError::BatchTooLarge).
pub const BATCH_COUNT_MAX: usize = 65_536;

/// Default maximum record size (header, key, headers and payload), in bytes:
/// a 1 MiB payload plus room for its key and headers.
pub const RECORD_SIZE_DEFAULT: u32 = 1024 * 1024 + 128 * 1024;

/// One sparse-index entry is kept per this many bytes of log (32 KiB), so the
/// index costs 8 bytes per 32 KiB: 2.5 MiB for a 10 GiB backlog. A read by
/// offset scans at most this many bytes of record headers.
pub const INDEX_INTERVAL_BYTES: u64 = 32 * 1024;

/// Fill of the active segment, in percent of the segment size, past which
/// the flusher prepares the log's spare segment (50): created,
/// preallocated (`SEGMENT_GROWTH_STEP_MIN`) and synced on the flush pool, so
/// that the append that rolls the log renames it instead of creating a file
/// (see `docs/storage-format.md`, §3.1). Early enough that a steady writer
/// never finds it missing (half a segment of appends to make one file);
/// late enough that a lane that never fills a segment holds no spare.
pub const SPARE_PREPARE_FILL_PERCENT: u64 = 50;

/// Default amount of synced data, in bytes, between two checkpoints (8 MiB).
/// Recovery after a crash scans at most this much plus the unsynced tail.
pub const CHECKPOINT_INTERVAL_BYTES_DEFAULT: u64 = 8 * 1024 * 1024;

/// Default dedupe window (5 minutes): idempotency keys younger than this are
/// recovered on open.
pub const DEDUPE_WINDOW_MS_DEFAULT: u64 = 5 * 60 * 1000;

/// Default ceiling for the idempotency keys recovered on open (the newest are
/// kept). Bounds the memory the dedupe map may take per log.
pub const DEDUPE_KEYS_MAX_DEFAULT: u32 = 100_000;

/// Ceiling for `dedupe_keys_max`.
pub const DEDUPE_KEYS_MAX: u32 = 10_000_000;

/// Flusher period, in milliseconds, of a log with the `none` policy: as for
/// `Interval { interval_ms: 1000 }`, each period with work syncs the written
/// segments, writes and syncs the buffered ack entries, and writes a
/// checkpoint.
pub const BACKGROUND_FLUSH_MS: u64 = 1000;

/// Pause, in milliseconds, before the flusher writes the ack journal again
/// after a write failed with ENOSPC. The acks stay buffered and their
/// commits pending meanwhile; data syncs go on. Short enough that acks
/// commit soon after space returns, long enough that a full disk does not
/// turn the flusher into a busy loop.
pub const ACK_JOURNAL_RETRY_MS: u64 = 100;

/// After a full disk stopped a journal compaction (ack or key journal)
/// before it touched the journal, in ms before the next try: the journal
/// stays valid, only longer, so nothing is poisoned; a compaction rewrites
/// the whole journal, so it is not retried on every flush.
pub const COMPACTION_RETRY_MS: u64 = 1000;

/// Fewest threads in a [`FlushPool`](crate::FlushPool) (2): with one, a log
/// whose fsync stalls would hold up every other log's commits. A smaller
/// request is raised to this.
pub const FLUSH_THREADS_MIN: usize = 2;

/// Most threads in a [`FlushPool`](crate::FlushPool) (64). Each thread runs
/// one log's cycle at a time, so more threads only help while that many
/// devices or fsyncs can make progress at once; a larger request is lowered
/// to this.
pub const FLUSH_THREADS_MAX: usize = 64;

/// Ceiling of the default pool size, which is the machine's cores (at least
/// `FLUSH_THREADS_MIN`): 16.
pub const FLUSH_THREADS_DEFAULT_MAX: usize = 16;

/// Default capacity of a [`FileCache`](crate::FileCache): at most this many
/// descriptors of log files open at once (512), like RocksDB's
/// `max_open_files`. Half of the common soft limit of 1,024, leaving the
/// rest to sockets and the broker's own files. Past it the least recently
/// used descriptor is closed; its file is opened again on its next write or
/// sync (reads go through maps and need none).
pub const OPEN_FILES_DEFAULT: usize = 512;

/// Smallest cache capacity (16): a log's active segment, its journals and
/// checkpoint, and the few files an operation has open at once. A smaller
/// request is raised to this.
pub const OPEN_FILES_MIN: usize = 16;

/// Largest cache capacity (1,048,576, the usual hard `RLIMIT_NOFILE` ceiling
/// of Linux); a larger request is lowered to this.
pub const OPEN_FILES_MAX: usize = 1 << 20;

/// Ceiling for the `interval` sync policy, in milliseconds (1 minute).
pub const SYNC_INTERVAL_MS_MAX: u64 = 60_000;

// Positions and sizes are `u64` on disk and converted to `usize` to index
// maps; the engine supports 64-bit targets only, so those casts are lossless.
const _: () = assert!(usize::BITS == 64, "ballast-storage needs a 64-bit target");
const _: () = assert!(SEGMENT_SIZE_MIN > SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE as u64);
const _: () = assert!(SEGMENT_SIZE_MAX <= u32::MAX as u64);
const _: () = assert!(SEGMENT_GROWTH_STEP_MIN <= SEGMENT_SIZE_MIN, "an empty segment never exceeds its step");
const _: () = assert!(SEGMENT_GROWTH_STEP_MIN % RECORD_ALIGN == 0);
const _: () = assert!(SEGMENT_HEADER_SIZE % RECORD_ALIGN == 0);
const _: () = assert!(RECORD_HEADER_SIZE as u64 % RECORD_ALIGN == 0);
const _: () = assert!(KEY_SIZE_MAX <= u16::MAX as u32);
const _: () = assert!(
    (RECORD_SIZE_DEFAULT as u64) + SEGMENT_HEADER_SIZE <= SEGMENT_SIZE_DEFAULT,
    "a default-size record must fit in a default-size segment"
);
const _: () = assert!(SPARE_PREPARE_FILL_PERCENT < 100, "a spare is prepared before the segment is full");
const _: () = assert!(FLUSH_THREADS_MIN >= 2, "one stalled fsync must not hold up every log");
const _: () = assert!(FLUSH_THREADS_MIN <= FLUSH_THREADS_DEFAULT_MAX && FLUSH_THREADS_DEFAULT_MAX <= FLUSH_THREADS_MAX);
const _: () = assert!(OPEN_FILES_MIN <= OPEN_FILES_DEFAULT && OPEN_FILES_DEFAULT <= OPEN_FILES_MAX);
