use std::path::Path;

use bytes::Bytes;
use openraft::storage::RaftLogStorageExt;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader};

use super::*;
use crate::cluster::testing::MemStateMachine;
use crate::cluster::{Command, RecordData};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, MemStateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, MemStateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = LogStore::open(dir.path()).expect("opening an empty log store");
        Ok((dir, store, MemStateMachine::default()))
    }
}

type StoreSuite = Suite<TypeConfig, LogStore, MemStateMachine, Builder, tempfile::TempDir>;

/// The store passes openraft's own storage suite (`Suite::test_store`'s
/// list, run one by one), except `get_initial_state_membership_from_log_and_sm`,
/// which appends index 3 after index 1: openraft itself never appends with
/// a hole, and this store refuses it by design (see
/// `append_out_of_order_is_refused`).
#[test]
fn openraft_storage_suite() {
    macro_rules! run {
        ($($case:ident),* $(,)?) => {$(
            run_case(stringify!($case), StoreSuite::$case);
        )*};
    }
    run!(
        last_membership_in_log_initial,
        last_membership_in_log,
        last_membership_in_log_multi_step,
        get_membership_initial,
        get_membership_from_log_and_empty_sm,
        get_membership_from_empty_log_and_sm,
        get_membership_from_log_le_sm_last_applied,
        get_membership_from_log_gt_sm_last_applied_1,
        get_membership_from_log_gt_sm_last_applied_2,
        get_initial_state_without_init,
        get_initial_state_with_state,
        get_initial_state_last_log_gt_sm,
        get_initial_state_last_log_lt_sm,
        get_initial_state_log_ids,
        get_initial_state_re_apply_committed,
        save_vote,
        get_log_entries,
        limited_get_log_entries,
        try_get_log_entry,
        initial_logs,
        get_log_state,
        get_log_id,
        last_id_in_log,
        last_applied_state,
        purge_logs_upto_0,
        purge_logs_upto_5,
        purge_logs_upto_20,
        delete_logs_since_11,
        delete_logs_since_0,
        append_to_log,
        snapshot_meta,
        apply_single,
        apply_multiple,
    );
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(StoreSuite::transfer_snapshot(&Builder)).expect("suite case transfer_snapshot");
}

/// Runs one case of the suite on a fresh store, in a runtime of its own
/// (as the suite's own runner does).
fn run_case<F, Fut>(name: &str, case: F)
where
    F: Fn(LogStore, MemStateMachine) -> Fut,
    Fut: std::future::Future<Output = Result<(), StorageError>>,
{
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let result = runtime.block_on(async {
        let (dir, store, sm) = Builder.build().await?;
        let result = case(store, sm).await;
        wait_released(dir.path());
        result
    });
    if let Err(e) = result {
        panic!("suite case {name}: {e}");
    }
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// An entry carrying a command with a payload of `payload_size` bytes.
fn entry(term: u64, index: u64, payload_size: usize) -> Entry {
    let record = RecordData {
        timestamp_ms: 1,
        attempt: 0,
        flags: 0,
        key: None,
        headers: Vec::new(),
        payload: Bytes::from(vec![index as u8; payload_size]),
    };
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Command::Append {
            queue: "q".into(),
            lane: 0,
            term: None,
            records: vec![record],
        }),
    }
}

fn entries(term: u64, indexes: std::ops::Range<u64>) -> Vec<Entry> {
    indexes.map(|i| entry(term, i, 100)).collect()
}

async fn all(store: &mut LogStore) -> Vec<Entry> {
    store.try_get_log_entries(..).await.expect("reading the log")
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("listing")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    paths.sort();
    paths
}

fn frame_size() -> u64 {
    encode_frame(&entry(1, 0, 100)).expect("encodes").len() as u64
}

/// Appended entries, the vote and the committed id survive a reopen, and
/// reads come from the files (the cache is empty after open).
#[tokio::test]
async fn reopen_keeps_entries_vote_and_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let written = entries(1, 0..10);
    {
        let mut store = LogStore::open(dir.path()).expect("open");
        store.blocking_append(written.clone()).await.expect("append");
        store.save_vote(&Vote::new(3, 2)).await.expect("vote");
        store.save_committed(Some(log_id(1, 7))).await.expect("committed");
        // Queued behind the appends: a vote after it waits for it.
        store.save_vote(&Vote::new(4, 2)).await.expect("vote");
    }
    let mut store = LogStore::open(dir.path()).expect("reopen");
    assert_eq!(all(&mut store).await, written);
    assert_eq!(store.read_vote().await.expect("vote"), Some(Vote::new(4, 2)));
    assert_eq!(store.read_committed().await.expect("committed"), Some(log_id(1, 7)));
    let state = store.get_log_state().await.expect("state");
    assert_eq!(state.last_log_id, Some(log_id(1, 9)));
    assert_eq!(state.last_purged_log_id, None);
    let mut reader = store.get_log_reader().await;
    assert_eq!(reader.try_get_log_entries(3..5).await.expect("read"), written[3..5].to_vec());
}

/// A segment holds frames up to exactly its size; one byte less and the
/// third frame starts a new segment. Entries read back across segments.
#[tokio::test]
async fn segments_roll_at_their_size() {
    let frame = frame_size();
    for (segment_size, per_segment) in [(3 * frame, 3), (3 * frame - 1, 2)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = entries(1, 0..7);
        {
            let mut store =
                LogStore::open_with(dir.path(), Options { segment_size, ..Options::default() }).expect("open");
            store.blocking_append(written[..4].to_vec()).await.expect("append");
            store.blocking_append(written[4..].to_vec()).await.expect("append");
        }
        let paths = segments(dir.path());
        assert_eq!(paths.len(), 7usize.div_ceil(per_segment), "segment size {segment_size}");
        assert_eq!(std::fs::metadata(&paths[0]).expect("stat").len(), per_segment as u64 * frame);
        let mut store =
            LogStore::open_with(dir.path(), Options { segment_size, ..Options::default() }).expect("reopen");
        assert_eq!(all(&mut store).await, written);
    }
}

/// A torn last frame (cut short, or failing its CRC) is cut off on open;
/// the log then continues from the entry before it.
#[tokio::test]
async fn torn_last_frame_is_cut_off() {
    for damage in ["short", "crc", "zeros"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = entries(1, 0..5);
        {
            let mut store = LogStore::open(dir.path()).expect("open");
            store.blocking_append(written.clone()).await.expect("append");
        }
        let path = segments(dir.path()).pop().expect("a segment");
        let len = std::fs::metadata(&path).expect("stat").len();
        let file = OpenOptions::new().write(true).open(&path).expect("open segment");
        match damage {
            "short" => file.set_len(len - 3).expect("cut"),
            "crc" => file.write_all_at(&[0xff], len - 1).expect("flip"),
            _ => file.set_len(len + 4096).expect("zero fill"),
        }
        drop(file);
        let mut store = LogStore::open(dir.path()).expect("reopen after a torn write");
        let expected = if damage == "zeros" { written.clone() } else { written[..4].to_vec() };
        assert_eq!(all(&mut store).await, expected, "{damage}");
        let frames = expected.len() as u64;
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), frames * frame_size(), "{damage}: file cut");
        if damage != "zeros" {
            store.blocking_append([entry(2, 4, 100)]).await.expect("append after the cut");
            drop(store);
            let mut store = LogStore::open(dir.path()).expect("reopen");
            assert_eq!(all(&mut store).await.last().map(|e| e.log_id), Some(log_id(2, 4)));
        }
    }
}

/// A frame failing its CRC before the last one is an error on open, never
/// a silent loss of the entries after it; so is a bad frame in a segment
/// that is not the last.
#[tokio::test]
async fn corrupt_frame_before_the_tail_is_an_error() {
    let frame = frame_size();
    for (segment_size, damaged_at) in [(RAFT_SEGMENT_SIZE, 2 * frame + 20), (2 * frame, frame + 20)] {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut store =
                LogStore::open_with(dir.path(), Options { segment_size, ..Options::default() }).expect("open");
            store.blocking_append(entries(1, 0..5)).await.expect("append");
        }
        let path = segments(dir.path()).remove(0);
        let file = OpenOptions::new().write(true).open(&path).expect("open segment");
        file.write_all_at(&[0xee], damaged_at).expect("flip");
        drop(file);
        match LogStore::open_with(dir.path(), Options { segment_size, ..Options::default() }) {
            Err(LogStoreError::Corrupt { offset, .. }) => assert_eq!(offset, damaged_at - 20),
            other => panic!("expected corruption, got {other:?}"),
        }
    }
}

/// A truncation cuts the segment at the frame and deletes the segments
/// after it; new entries then continue from there, across a reopen.
#[tokio::test]
async fn truncate_then_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let segment_size = 3 * frame_size();
    {
        let mut store = LogStore::open_with(dir.path(), Options { segment_size, ..Options::default() }).expect("open");
        store.blocking_append(entries(1, 0..10)).await.expect("append");
        assert_eq!(segments(dir.path()).len(), 4);
        store.truncate(log_id(1, 4)).await.expect("truncate");
        assert_eq!(segments(dir.path()).len(), 2, "later segments deleted");
        assert_eq!(all(&mut store).await, entries(1, 0..4));
        store.blocking_append(entries(2, 4..6)).await.expect("append");
    }
    let mut store = LogStore::open_with(dir.path(), Options { segment_size, ..Options::default() }).expect("reopen");
    let mut expected = entries(1, 0..4);
    expected.extend(entries(2, 4..6));
    assert_eq!(all(&mut store).await, expected);
    // Truncating at a segment's first frame deletes that segment.
    store.truncate(log_id(1, 3)).await.expect("truncate");
    assert_eq!(segments(dir.path()).len(), 1);
    drop(store);
    let mut store = LogStore::open_with(dir.path(), Options { segment_size, ..Options::default() }).expect("reopen");
    assert_eq!(all(&mut store).await, entries(1, 0..3));
}

/// A purge deletes the segments wholly below it and remembers the purged
/// id; after a reopen the log starts after it.
#[tokio::test]
async fn purge_then_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let segment_size = 3 * frame_size();
    {
        let mut store = LogStore::open_with(dir.path(), Options { segment_size, ..Options::default() }).expect("open");
        store.blocking_append(entries(1, 0..20)).await.expect("append");
        store.purge(log_id(1, 12)).await.expect("purge");
        // Segments start at 0, 3, 6, 9, 12, 15, 18: 12's keeps 13 and 14.
        assert_eq!(segments(dir.path()).len(), 3);
        assert_eq!(all(&mut store).await, entries(1, 13..20));
    }
    let mut store = LogStore::open_with(dir.path(), Options { segment_size, ..Options::default() }).expect("reopen");
    let state = store.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 12)));
    assert_eq!(state.last_log_id, Some(log_id(1, 19)));
    assert_eq!(all(&mut store).await, entries(1, 13..20));
    // Purging everything leaves the purged id as the last one, and the
    // next append continues after it.
    store.purge(log_id(1, 25)).await.expect("purge");
    assert!(segments(dir.path()).is_empty());
    store.blocking_append(entries(2, 26..27)).await.expect("append");
    drop(store);
    let mut store = LogStore::open_with(dir.path(), Options { segment_size, ..Options::default() }).expect("reopen");
    assert_eq!(all(&mut store).await, entries(2, 26..27));
}

/// A gap in the log (an append that does not continue it) is refused and
/// changes nothing.
#[tokio::test]
async fn append_out_of_order_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path()).expect("open");
    store.blocking_append(entries(1, 0..3)).await.expect("append");
    assert!(store.blocking_append(entries(1, 4..5)).await.is_err());
    assert_eq!(all(&mut store).await, entries(1, 0..3));
}

/// An entry of exactly the frame limit encodes; one byte more is refused.
#[test]
fn entry_size_limit() {
    let probe = 1 << 22;
    let overhead = encode_frame(&entry(1, 0, probe)).expect("encodes").len() - probe - FRAME_HEADER_SIZE as usize;
    let at_limit = RAFT_ENTRY_SIZE_MAX as usize - overhead;
    let frame = encode_frame(&entry(1, 0, at_limit)).expect("an entry at the limit encodes");
    assert_eq!(frame.len() - FRAME_HEADER_SIZE as usize, RAFT_ENTRY_SIZE_MAX as usize);
    match encode_frame(&entry(1, 0, at_limit + 1)) {
        Err(LogStoreError::EntryTooLarge { size, .. }) => assert_eq!(size, RAFT_ENTRY_SIZE_MAX as usize + 1),
        other => panic!("expected EntryTooLarge, got {other:?}"),
    }
}

/// A failed write fails its append's callback and poisons the store:
/// later writes (here a vote) fail with the previous-I/O error instead of
/// trusting a page cache that may have dropped the data.
#[tokio::test]
async fn failed_write_poisons_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raft_dir = dir.path().join("raft");
    let mut store =
        LogStore::open_with(&raft_dir, Options { segment_size: 3 * frame_size(), ..Options::default() }).expect("open");
    store.blocking_append(entries(1, 0..3)).await.expect("append");
    // The next append needs a new segment file, which cannot be created.
    std::fs::remove_dir_all(&raft_dir).expect("remove the directory");
    assert!(store.blocking_append(entries(1, 3..4)).await.is_err(), "the append's callback reports the failure");
    let error = store.save_vote(&Vote::new(2, 1)).await.expect_err("poisoned");
    assert!(error.to_string().contains("stopped writing after an I/O error"), "{error}");
}

/// The cache keeps written entries up to its size: at exactly three
/// entries' bodies it holds three, one byte less and it holds two; every
/// entry still reads back (from the segment).
#[tokio::test]
async fn cache_is_bounded_by_its_size() {
    let body = frame_size() - FRAME_HEADER_SIZE;
    for (cache_size_max, cached) in [(3 * body, 3), (3 * body - 1, 2)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store =
            LogStore::open_with(dir.path(), Options { cache_size_max, ..Options::default() }).expect("open");
        store.blocking_append(entries(1, 0..6)).await.expect("append");
        {
            let state = store.shared.state.lock();
            assert_eq!(state.cache.len(), cached, "cache size {cache_size_max}");
            assert!(state.cache_size <= cache_size_max);
            assert_eq!(state.cache.back().map(|e| e.log_id), Some(log_id(1, 5)), "the newest are kept");
        }
        assert_eq!(all(&mut store).await, entries(1, 0..6));
    }
}

/// A directory whose store is still open is refused after the lock wait;
/// once that store is dropped (its writer done), it opens.
#[tokio::test]
async fn a_directory_is_opened_by_one_store_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path()).expect("open");
    store.blocking_append(entries(1, 0..2)).await.expect("append");
    let quick = Options { lock_wait: Duration::from_millis(50), ..Options::default() };
    match LogStore::open_with(dir.path(), quick) {
        Err(LogStoreError::InUse { waited_ms, .. }) => assert_eq!(waited_ms, 50),
        other => panic!("expected InUse, got {other:?}"),
    }
    drop(store);
    let mut store = LogStore::open(dir.path()).expect("open after the first store is gone");
    assert_eq!(all(&mut store).await, entries(1, 0..2));
}

/// Replication's reads stop at the size limit: bodies up to exactly the
/// limit are read together, one byte less leaves the last one out; one
/// entry is always read, even over the limit.
#[tokio::test]
async fn limited_reads_stop_at_the_size_limit() {
    let body = frame_size() - FRAME_HEADER_SIZE;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path()).expect("open");
    store.blocking_append(entries(1, 0..6)).await.expect("append");
    for (size_max, count) in [(3 * body, 3), (3 * body - 1, 2), (1, 1)] {
        let read = read_entries(&store.shared, 1..6, size_max).await.expect("read");
        assert_eq!(read, entries(1, 1..1 + count), "size limit {size_max}");
    }
    let mut reader = store.get_log_reader().await;
    assert_eq!(reader.limited_get_log_entries(0, 6).await.expect("read"), entries(1, 0..6));
}

/// The index on open decodes only an entry's log id: its encoding must
/// start with it, whatever the payload.
#[test]
fn an_entry_encoding_starts_with_its_log_id() {
    let membership = Entry {
        log_id: log_id(7, 300),
        payload: EntryPayload::Membership(openraft::Membership::new(vec![[1u64, 2, 3].into()], None)),
    };
    for entry in [entry(5, 1 << 40, 10), Entry { log_id: log_id(6, 2), payload: EntryPayload::Blank }, membership] {
        let body = postcard::to_allocvec(&entry).expect("encodes");
        let (prefix, _) = postcard::take_from_bytes::<LogId>(&body).expect("a log id first");
        assert_eq!(prefix, entry.log_id);
    }
}

/// Random appends, truncations, purges and reopens, on small segments
/// and a small cache, against a model (a vector of entries): after every
/// step the store holds exactly the model's entries and log state. The
/// seed is printed; `RAFT_LOG_SEED=<n>` replays it.
#[tokio::test]
async fn random_operations_match_a_model() {
    let seed: u64 = std::env::var("RAFT_LOG_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("RAFT_LOG_SEED={seed}");
    let mut rng = seed | 1;
    let mut next_random = move |bound: u64| {
        // xorshift64: enough to pick operations, reproducible from the seed.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % bound.max(1)
    };
    let body = frame_size() - FRAME_HEADER_SIZE;
    let options = Options { segment_size: 3 * frame_size() + 7, cache_size_max: 2 * body, ..Options::default() };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open_with(dir.path(), options).expect("open");
    let mut model: Vec<Entry> = Vec::new();
    let mut purged: Option<LogId> = None;
    let mut term = 1;
    for step in 0..300 {
        let next = model.last().map(|e| e.log_id.index + 1).or(purged.map(|p| p.index + 1)).unwrap_or(0);
        match next_random(10) {
            0..=4 => {
                let count = 1 + next_random(4);
                let new = entries(term, next..next + count);
                store.blocking_append(new.clone()).await.expect("append");
                model.extend(new);
            }
            5 | 6 if !model.is_empty() => {
                let at = next_random(model.len() as u64) as usize;
                store.truncate(model[at].log_id).await.expect("truncate");
                model.truncate(at);
                term += 1;
            }
            7 if !model.is_empty() => {
                let upto = next_random(model.len() as u64) as usize;
                purged = Some(model[upto].log_id);
                store.purge(model[upto].log_id).await.expect("purge");
                model.drain(..=upto);
            }
            8 => {
                drop(store);
                wait_released(dir.path());
                store = LogStore::open_with(dir.path(), options).expect("reopen");
            }
            _ => {}
        }
        assert_eq!(all(&mut store).await, model, "step {step}, seed {seed}");
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, purged, "step {step}, seed {seed}");
        assert_eq!(state.last_log_id, model.last().map(|e| e.log_id).or(purged), "step {step}, seed {seed}");
        if let Some(first) = model.first().map(|e| e.log_id.index) {
            let from = first + next_random(model.len() as u64);
            let read = store.try_get_log_entries(from..from + 3).await.expect("read");
            let offset = (from - first) as usize;
            assert_eq!(read, model[offset..(offset + 3).min(model.len())].to_vec(), "step {step}, seed {seed}");
        }
    }
}
