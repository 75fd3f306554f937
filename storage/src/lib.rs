//! `ballast-storage`: the durable log under every Ballast queue lane.
//!
//! One [`Log`] per (queue, lane): an append-only sequence of CRC-checked
//! records in memory-mapped segment files preallocated as they grow, with group-committed
//! syncs, durable ack state, retention that follows the backlog, and crash
//! recovery. The API is synchronous and runtime-free; a [`Commit`] is a plain
//! `std::future::Future` (and can also be waited on).
//!
//! Layout, in reading order:
//! - [`limits`]: every ceiling and default, named.
//! - `options`: [`LogOptions`] and [`SyncPolicy`].
//! - `error`: typed errors per operation.
//! - [`record`]: the record format, encode/decode and CRC; the codec is
//!   public ([`record::encode`], [`record::decode`]) for tools and benches.
//! - `segment`: one segment file, its map and sparse index.
//! - `log`: [`Log`], appends and group commit, reads, [`Cursor`], the flusher.
//! - `pool`: [`FlushPool`], the bounded threads that run every log's flusher.
//! - `acks`: ack state (floor plus ranges) and its journal.
//! - `checkpoint`: the durable point recovery starts from.
//! - `keys`: the idempotency-key journal for the broker's dedupe.
//! - `recovery`: what `Log::open` does to a directory.
//! - `file`: the I/O seam, with fault injection ([`Faults`]).
//! - `file_cache`: [`FileCache`], the bounded set of open descriptors that
//!   every file of a log is reached through.
//!
//! Invariants:
//! 1. A record is returned only after its length, offset and CRC validate.
//! 2. Offsets are contiguous: every offset below `next_offset` is either a
//!    record, done, or reported corrupt and quarantined.
//! 3. Under [`SyncPolicy::Fsync`] a commit resolves only after `fdatasync`
//!    of every segment holding the batch.
//! 4. Memory is O(segments + sparse index + ack holes + dedupe keys), never
//!    O(records): the backlog lives in the files and the page cache.
//! 5. A segment is removed only when every record in it is done and
//!    checkpointed (its keys are in the key journal).
//! 6. An ack becomes durable only after the record it acks: its journal
//!    entry waits until the record is synced, and recovery drops acks above
//!    the recovered end of the log.
//! 7. An offset is never handed out twice for records that reached stable
//!    storage: recovery never ends the log below a checkpoint's
//!    `next_offset` or inside a set-aside last segment; such a shortfall is
//!    quarantined instead. Only a torn tail of never-synced records is
//!    reused.

pub mod limits;

mod acks;
mod checkpoint;
mod error;
mod file;
mod file_cache;
mod keys;
mod log;
mod options;
mod pool;
pub mod record;
mod recovery;
mod segment;

pub use acks::AckKind;
pub use error::{AckError, AppendError, OpenError, ReadError, SyncError};
pub use file::Faults;
pub use file_cache::FileCache;
pub use keys::KeyEntry;
pub use log::{Appended, Commit, Cursor, Log, LogStats};
pub use options::{LogOptions, SyncPolicy};
pub use pool::FlushPool;
pub use record::{NewRecord, Record, stored_size};
