//! One segment file: a file of at most the segment size holding a header and
//! a run of records, read through a memory map of the full segment size.
//!
//! The file grows with the records it holds: it is created with the first
//! growth step (`SEGMENT_GROWTH_STEP_MIN`) and preallocated further, in
//! doubling steps up to the segment size, before the writer needs the space
//! (`Segment::grow`). The map covers the full segment size from the start,
//! so growth never remaps; only the first `allocated` bytes of it are backed
//! by the file.
//!
//! Contract of the map (the reason the `unsafe` below is sound):
//! 1. Nothing reads the map at or past `allocated`, which is never more
//!    than the file's length: the file is preallocated (real blocks, zeros)
//!    up to `allocated` before it is raised, and never truncated while
//!    mapped, so no read of the map can fault (SIGBUS). `written` never
//!    exceeds `allocated`.
//! 2. Bytes below `written` are never modified again while the segment is
//!    open; writers only write at or above `written` and publish the new end
//!    with a release store. Readers only read below `written`.
//! 3. Recovery may zero a torn tail before any reader exists.
//! 4. Past the end of valid data, the active segment holds only zeros: the
//!    file was preallocated with zeros, the writer only appends at the end
//!    (a failed write poisons the log until recovery), and recovery zeroes
//!    and syncs every byte a crash may have left past the end. A clean close
//!    and recovery rely on this to skip the unused rest of the segment.

use crate::file_cache::FilePath;
use std::sync::Arc;
use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::{
    error::OpenError,
    file::{self, Io},
    file_cache::CachedFile,
    limits::{INDEX_INTERVAL_BYTES, SEGMENT_GROWTH_STEP_MIN, SEGMENT_HEADER_SIZE, SEGMENT_SIZE_MAX, SEGMENT_SIZE_MIN},
    record::{self, Invalid},
};

pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"BLSTSEG\0";
/// Version 2: the file may be shorter than the size in its header (it grows
/// with its records). Version 1 files (always the full size) are read too;
/// a build that knows only version 1 refuses version 2 files rather than
/// setting them aside as damaged.
pub(crate) const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub(crate) const FORMAT_VERSION_MIN: u32 = 1;
pub(crate) const SEGMENT_SUFFIX: &str = "seg";
/// The name of a log's spare segment: a file the flusher creates,
/// preallocates and syncs ahead of need, which the append that rolls the
/// log renames to its segment name (`Segment::from_spare`). Not a segment
/// name, so recovery never reads it as one: it removes it.
pub(crate) const SPARE_FILE_NAME: &str = "spare";
/// The base offset in a spare's header: no segment has it (an offset is
/// below `u64::MAX`). A `<base>.seg` whose header carries it is a spare
/// renamed by a roll whose own header never reached the disk: nothing in
/// it was ever acknowledged (`recovery`).
pub(crate) const SPARE_BASE: u64 = u64::MAX;
/// The spare a roll makes for itself when the flusher's is not ready: a
/// `.tmp` name, so an open removes one a crash left.
pub(crate) const ROLL_FILE_NAME: &str = "roll.tmp";

/// One segment of a log.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Offset of the first record in this segment; also its file name.
    pub base_offset: u64,
    pub path: Arc<Path>,
    /// Through the descriptor cache: a sealed, synced segment holds no
    /// descriptor (`Segment::release_descriptor`); its map needs none.
    file: CachedFile,
    /// The whole segment size, mapped read-only; slices of it are handed
    /// out as zero-copy payloads and keep the map alive. Only the first
    /// `allocated` bytes are backed by the file. Made on first need
    /// ([`Segment::ensure_mapped`]): a segment that holds records, or is
    /// sealed, is always mapped; an empty active segment (an idle lane)
    /// holds no map, so it costs no kernel mapping (`vm.max_map_count`).
    map: OnceLock<Bytes>,
    /// The segment size from the header: the length of the map.
    size: u64,
    /// Bytes of the file preallocated (and so readable through the map).
    /// Raised by [`Segment::grow`] after the space is allocated; never
    /// lowered while the segment is open.
    allocated: AtomicU64,
    /// Serialises growth (the writer, or segment preparation ahead of it).
    growth: Mutex<()>,
    /// End of valid data, in bytes from the start of the file. Release-stored
    /// by the single writer after the bytes are written, acquire-loaded by
    /// readers. For a sealed segment recovered without a scan, it is the file
    /// size and readers are bounded by offsets instead.
    written: AtomicU64,
    /// Sparse index: `(offset - base_offset, position)` roughly every
    /// [`INDEX_INTERVAL_BYTES`], ascending.
    index: Mutex<SparseIndex>,
}

#[derive(Debug, Default)]
struct SparseIndex {
    entries: Vec<(u32, u32)>,
    /// Whether `entries` covers the segment; sealed segments recovered without
    /// a scan build their index lazily on the first read by offset.
    complete: bool,
    /// Position just past the last indexed entry (for incremental appends).
    last_indexed_pos: u64,
    /// Records below this offset are not indexed yet: recovery after a kill
    /// scans from the checkpoint, in the middle of this segment, and leaves
    /// the trusted prefix before it to the first read by offset below it
    /// ([`Segment::index_prefix`]), as a clean open leaves a whole segment.
    unindexed_below: Option<u64>,
}

pub(crate) fn file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.{SEGMENT_SUFFIX}")
}

/// Parses a segment file name back into its base offset.
pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?.strip_suffix('.')?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit())).then(|| stem.parse().ok())?
}

fn encode_header(base_offset: u64, size: u64) -> [u8; SEGMENT_HEADER_SIZE as usize] {
    let mut h = [0u8; SEGMENT_HEADER_SIZE as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SEGMENT_HEADER_SIZE as u32).to_le_bytes());
    h[16..24].copy_from_slice(&base_offset.to_le_bytes());
    h[24..32].copy_from_slice(&size.to_le_bytes());
    let crc = crc32fast::hash(&h[0..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

impl Segment {
    /// Creates, preallocates and syncs a new segment file, with room for
    /// at least its first `end` bytes (header included), rounded up to a
    /// growth step; mapped if records are to be written (`end` past the
    /// header). Recovery's way to start a segment (an append rolls onto a
    /// spare instead, `Segment::from_spare`). The caller syncs the
    /// directory. On error the file is removed again (and the directory
    /// synced, best effort), so the creation can be retried under the same
    /// name.
    pub(crate) fn create(io: &Io, dir: &Path, base_offset: u64, size: u64, end: u64) -> io::Result<Segment> {
        let path = dir.join(file_name(base_offset));
        let file = file::open_rw(&path, true)?;
        let allocated = next_allocation(0, end.max(SEGMENT_HEADER_SIZE), size);
        let prepared = Segment::prepare(io, file, path.clone(), base_offset, size, allocated).and_then(|segment| {
            if end > SEGMENT_HEADER_SIZE {
                segment.ensure_mapped(io)?;
            }
            Ok(segment)
        });
        match prepared {
            Ok(segment) => Ok(segment),
            Err(e) => {
                // The file was closed by `prepare`; nothing else refers to it.
                let _ = std::fs::remove_file(&path);
                let _ = io.sync_dir(dir);
                Err(e)
            }
        }
    }

    /// The part of [`Segment::create`] after the file exists.
    fn prepare(io: &Io, file: File, path: PathBuf, base_offset: u64, size: u64, allocated: u64) -> io::Result<Segment> {
        io.preallocate(&file, 0, allocated)?;
        io.write_at(&file, &encode_header(base_offset, size), 0)?;
        io.sync_data(&file)?;
        // Mapped when first written (`ensure_mapped`): an empty segment
        // costs no mapping.
        let segment = Segment::new(io, path, file, base_offset, size, allocated);
        segment.written.store(SEGMENT_HEADER_SIZE, Ordering::Release);
        segment.index.lock().complete = true;
        Ok(segment)
    }

    /// Creates a spare segment file `dir/name` (replacing a leftover one):
    /// the first growth step that holds `end` bytes preallocated and a header with base
    /// `SPARE_BASE`, synced if `durable`. The flusher prepares the log's
    /// spare (`SPARE_FILE_NAME`, durable) ahead of need, so that a roll
    /// that takes it pays no `fallocate` and no device flush; a roll that
    /// finds none makes one inline (`ROLL_FILE_NAME`, not synced) and takes
    /// it at once, so that a process killed at any point of a roll leaves a
    /// file that recovery recognises. The directory is not synced (a spare
    /// lost in a crash is only missing). Returns its allocated length. On
    /// error the file is removed.
    pub(crate) fn create_spare(io: &Io, dir: &Path, name: &str, size: u64, end: u64, durable: bool) -> io::Result<u64> {
        let path = dir.join(name);
        let allocated = next_allocation(0, end.max(SEGMENT_HEADER_SIZE), size);
        let made = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).and_then(
            |file| {
                io.preallocate(&file, 0, allocated)?;
                io.write_at(&file, &encode_header(SPARE_BASE, size), 0)?;
                if durable { io.sync_data(&file) } else { Ok(()) }
            },
        );
        match made {
            Ok(()) => Ok(allocated),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Turns the spare `dir/name` (`allocated` bytes, from
    /// [`Segment::create_spare`]) into the segment `base_offset`, with room
    /// for its first `end` bytes: renames it to its segment name and writes
    /// its header. No device flush: the caller's group commit syncs the
    /// header with the first records and the directory with the rename,
    /// before any of those records is acknowledged. A crash before that
    /// leaves either `spare` (removed at open) or `<base>.seg` with a
    /// header that says `SPARE_BASE` or its base (`recovery`). Grows the
    /// file if `end` is past the spare's allocation (`grown` says so). On
    /// error after the rename the file is removed again, so the roll can
    /// be retried (inline) under the same name.
    pub(crate) fn from_spare(
        io: &Io,
        dir: &Path,
        name: &str,
        base_offset: u64,
        size: u64,
        allocated: u64,
        end: u64,
    ) -> io::Result<(Segment, bool)> {
        let path = dir.join(file_name(base_offset));
        std::fs::rename(dir.join(name), &path)?;
        let made = file::open_rw(&path, false).and_then(|file| {
            io.write_at(&file, &encode_header(base_offset, size), 0)?;
            let segment = Segment::new(io, path.clone(), file, base_offset, size, allocated);
            segment.written.store(SEGMENT_HEADER_SIZE, Ordering::Release);
            segment.index.lock().complete = true;
            let grown = segment.grow(io, end)?;
            segment.ensure_mapped(io)?;
            Ok((segment, grown))
        });
        if made.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        made
    }

    /// Whether the file at `path` starts with a valid spare header (base
    /// `SPARE_BASE`): under a segment name, a spare renamed by a roll whose
    /// header rewrite never reached the disk.
    pub(crate) fn has_spare_header(path: &Path) -> bool {
        let mut h = [0u8; SEGMENT_HEADER_SIZE as usize];
        let read = File::open(path).and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut h, 0));
        read.is_ok()
            && h[0..8] == SEGMENT_MAGIC
            && crc32fast::hash(&h[0..60]) == u32::from_le_bytes(h[60..64].try_into().expect("4 bytes"))
            && u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")) == SPARE_BASE
    }

    /// Opens an existing segment and validates its header. `written` starts
    /// at the file size (sealed, trusted); recovery lowers it when it scans.
    pub(crate) fn open(io: &Io, path: &Path, base_offset: u64) -> Result<Segment, OpenError> {
        let not_a_log = |reason: String| OpenError::NotALog { path: path.to_owned(), reason };
        let file = file::open_rw(path, false).map_err(crate::error::io_open(path))?;
        let len = file.metadata().map_err(crate::error::io_open(path))?.len();
        if len < SEGMENT_HEADER_SIZE {
            return Err(not_a_log(format!("file is {len} bytes, shorter than a segment header")));
        }
        let mut h = [0u8; SEGMENT_HEADER_SIZE as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut h, 0).map_err(crate::error::io_open(path))?;
        if h[0..8] != SEGMENT_MAGIC {
            return Err(not_a_log("bad magic".into()));
        }
        if crc32fast::hash(&h[0..60]) != u32::from_le_bytes(h[60..64].try_into().expect("4 bytes")) {
            return Err(not_a_log("segment header fails its CRC".into()));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
            return Err(OpenError::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let base = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
        let size = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
        if base != base_offset {
            return Err(not_a_log(format!("header says base offset {base}, file name says {base_offset}")));
        }
        // Bytes from disk are input: positions in the sparse index are
        // `u32`, so a segment above the ceiling (which no writer makes) is
        // refused here rather than reaching an `expect` on the first read.
        if !(SEGMENT_SIZE_MIN..=SEGMENT_SIZE_MAX).contains(&size) {
            return Err(not_a_log(format!(
                "header says {size} bytes; segments are {SEGMENT_SIZE_MIN}..={SEGMENT_SIZE_MAX} bytes"
            )));
        }
        // A version 2 file grows with its records, so it may be shorter
        // than its size (a crash can also leave it at any length between
        // two growth steps); never longer.
        if len > size || (version == 1 && len != size) {
            return Err(not_a_log(format!("header says {size} bytes, file has {len}")));
        }
        // Not mapped yet: recovery maps what it reads and every sealed
        // segment; an empty active segment stays unmapped until written.
        let segment = Segment::new(io, path.to_owned(), file, base_offset, size, len);
        segment.written.store(len, Ordering::Release);
        Ok(segment)
    }

    fn new(io: &Io, path: PathBuf, file: File, base_offset: u64, size: u64, allocated: u64) -> Segment {
        debug_assert!(allocated <= size);
        let path: Arc<Path> = Arc::from(path);
        let file = io.files().insert(FilePath::Own(Arc::clone(&path)), file);
        Segment {
            base_offset,
            path,
            file,
            map: OnceLock::new(),
            size,
            allocated: AtomicU64::new(allocated),
            growth: Mutex::new(()),
            written: AtomicU64::new(0),
            index: Mutex::new(SparseIndex::default()),
        }
    }

    /// Maps the segment if it is not mapped yet. Called before the first
    /// write into it (so a failure refuses the append, nothing written),
    /// and by recovery for every segment it reads and every sealed one.
    pub(crate) fn ensure_mapped(&self, io: &Io) -> io::Result<()> {
        if self.map.get().is_some() {
            return Ok(());
        }
        let _growth = self.growth.lock();
        if self.map.get().is_some() {
            return Ok(());
        }
        io.before_map()?;
        let file = self.file.get()?;
        // SAFETY: see the module contract: the map may extend past the end
        // of the file, but nothing reads it at or past `allocated`, which
        // is at most the file's length (preallocated by `create`, measured
        // by `open`); the file is never truncated while mapped, and mapped
        // bytes below `written` are never modified.
        let map = unsafe { memmap2::MmapOptions::new().len(self.size as usize).map(&*file)? };
        let _ = self.map.set(Bytes::from_owner(map));
        Ok(())
    }

    /// Drops the map's pages from the process's resident set
    /// (`MADV_DONTNEED`): they stay in the page cache, and the next read
    /// faults them back in. Called after recovery, whose scan touched every
    /// page it read: at least one page per lane even for an empty one,
    /// which with tens of thousands of idle lanes was a third of the
    /// broker's memory after a restart.
    pub(crate) fn release_pages(&self) {
        if let Some(map) = self.map.get() {
            // SAFETY: the range is this segment's own shared file mapping,
            // alive as long as `self`. On a MAP_SHARED file mapping
            // MADV_DONTNEED discards nothing: dirty pages stay in the page
            // cache and are written back as usual; only this process's
            // page table entries go, until the pages are touched again.
            let rc = unsafe { libc::madvise(map.as_ptr().cast_mut().cast(), map.len(), libc::MADV_DONTNEED) };
            if rc != 0 {
                tracing::debug!(path = %self.path.display(), "madvise: {}", io::Error::last_os_error());
            }
        }
    }

    /// Whether the segment is mapped (tests and stats).
    pub(crate) fn is_mapped(&self) -> bool {
        self.map.get().is_some()
    }

    /// The map of a segment that must have one: it holds records (they
    /// were written after `ensure_mapped`), or recovery mapped it.
    fn mapped(&self) -> &Bytes {
        self.map.get().expect("a segment that holds records or is being recovered is mapped")
    }

    /// The segment size (from its header): the most the file grows to.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of the file preallocated so far: what the segment uses on
    /// disk, and how far the map may be read.
    pub(crate) fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Acquire)
    }

    /// Makes sure the file is preallocated up to at least `end` (at most
    /// the segment size), growing it to the next step when it is not:
    /// doubling from `SEGMENT_GROWTH_STEP_MIN`. A full disk is an error
    /// here, before anything is written, never a SIGBUS on a read of the
    /// map. No sync: the size change reaches the disk with the first
    /// `fdatasync` of the records written into the new space (see
    /// `docs/storage-format.md`, §3.1).
    /// Returns whether it had to grow the file (an `fallocate` ran).
    pub(crate) fn grow(&self, io: &Io, end: u64) -> io::Result<bool> {
        assert!(end <= self.size(), "growth past the segment size: {end} > {}", self.size());
        if end <= self.allocated() {
            return Ok(false);
        }
        let _growth = self.growth.lock();
        let allocated = self.allocated();
        if end <= allocated {
            return Ok(false);
        }
        let target = next_allocation(allocated, end, self.size());
        io.preallocate(&*self.file.get()?, allocated, target)?;
        self.allocated.store(target, Ordering::Release);
        Ok(true)
    }

    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Bytes from `pos` to the end of valid data (zero-copy).
    pub(crate) fn data_from(&self, pos: u64) -> Bytes {
        let end = self.written().max(pos);
        match self.map.get() {
            Some(map) => map.slice(pos as usize..end as usize),
            None => {
                // Unmapped: never written, so nothing past the header.
                debug_assert!(end <= SEGMENT_HEADER_SIZE, "an unmapped segment holds no records");
                Bytes::new()
            }
        }
    }

    /// Bytes from `pos` to the end of the file (its allocated part),
    /// whether written or not (recovery and resynchronisation only).
    pub(crate) fn raw_from(&self, pos: u64) -> &[u8] {
        &self.mapped()[pos as usize..self.allocated() as usize]
    }

    /// Writes encoded records at `pos` (which must be the current end) and
    /// publishes them to readers. Records are indexed as the caller reports
    /// their positions through `index_hint`.
    pub(crate) fn write(&self, io: &Io, buf: &[u8], pos: u64) -> io::Result<()> {
        assert_eq!(pos, self.written(), "segment write not at the end of valid data");
        assert!(self.is_mapped(), "a segment is mapped before it is written");
        assert!(pos + buf.len() as u64 <= self.allocated(), "segment write past the preallocated size");
        io.write_at(&*self.file.get()?, buf, pos)?;
        self.written.store(pos + buf.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Notes that the record `offset` starts at `pos`, adding a sparse index
    /// entry when `pos` is far enough from the last one.
    pub(crate) fn note_record(&self, offset: u64, pos: u64) {
        let mut index = self.index.lock();
        let rel = offset - self.base_offset;
        let after_last = index.entries.last().is_none_or(|&(r, _)| u64::from(r) < rel);
        if after_last && (index.entries.is_empty() || pos >= index.last_indexed_pos + INDEX_INTERVAL_BYTES) {
            index.push(self.base_offset, offset, pos);
        }
    }

    pub(crate) fn set_index_complete(&self) {
        self.index.lock().complete = true;
    }

    /// Leaves the records below `offset` out of the index until a read by
    /// offset needs them: they were synced and validated before the
    /// checkpoint at `offset`, so recovery does not touch them. Call before
    /// any record at or past `offset` is noted.
    pub(crate) fn set_unindexed_below(&self, offset: u64) {
        let mut index = self.index.lock();
        debug_assert!(index.entries.is_empty(), "the prefix is set before the scan indexes anything");
        index.unindexed_below = (offset > self.base_offset).then_some(offset);
    }

    /// Lowers the end of valid data after a recovery scan.
    pub(crate) fn set_written(&self, pos: u64) {
        self.written.store(pos, Ordering::Release);
    }

    /// Writes the segment's valid bytes (header to `written`) again, from
    /// the map, in chunks copied out first: after a failed sync, so that
    /// the next sync writes pages the kernel may have marked clean without
    /// writing them. Bytes are unchanged, so readers are unaffected.
    pub(crate) fn rewrite(&self, io: &Io) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let Some(map) = self.map.get() else {
            // Never written since open or creation: its header was synced
            // when it was created, and nothing else is in it.
            return Ok(());
        };
        let end = self.written().min(self.size());
        let file = self.file.get()?;
        let mut pos = 0;
        while pos < end {
            let to = (pos + CHUNK).min(end);
            let chunk = map[pos as usize..to as usize].to_vec();
            io.write_at(&file, &chunk, pos)?;
            pos = to;
        }
        Ok(())
    }

    pub(crate) fn sync(&self, io: &Io) -> io::Result<()> {
        io.sync_data(&*self.file.get()?)
    }

    /// Closes the segment's descriptor: call once it is sealed and synced.
    /// Its map stays; a later write or sync (recovery, a reopen) opens the
    /// file again.
    pub(crate) fn release_descriptor(&self) {
        self.file.close();
    }

    /// Overwrites `[from, to)` with zeros where it is not zero already, then
    /// syncs: used by recovery to erase a torn tail, so that stale bytes can
    /// never be mistaken for records later. Returns whether anything was not
    /// zero. Works from the end backwards: if it is interrupted, the bytes
    /// left at `from` still describe the whole range to the next recovery.
    pub(crate) fn zero_range(&self, io: &Io, from: u64, to: u64) -> io::Result<bool> {
        const CHUNK: u64 = 64 * 1024;
        assert!(to <= self.allocated(), "zeroing past the allocated end: {to} > {}", self.allocated());
        let zeros = vec![0u8; CHUNK as usize];
        let mut end = to;
        let mut dirty = false;
        while end > from {
            let start = (end - 1) / CHUNK * CHUNK;
            let start = start.max(from);
            if self.mapped()[start as usize..end as usize].iter().any(|&b| b != 0) {
                io.write_at(&*self.file.get()?, &zeros[..(end - start) as usize], start)?;
                dirty = true;
            }
            end = start;
        }
        if dirty {
            self.sync(io)?;
        }
        Ok(dirty)
    }

    /// The position of the record `offset`, which must lie in this segment
    /// below `end_offset`, hopping from the nearest index entry. Builds the
    /// index of a sealed segment on first use.
    pub(crate) fn locate(&self, offset: u64, end_offset: u64) -> Result<u64, Hop> {
        let (mut at_offset, mut pos) = {
            let mut index = self.index.lock();
            if !index.complete {
                self.build_index(&mut index, end_offset);
            } else if let Some(below) = index.unindexed_below
                && offset < below
            {
                self.index_prefix(&mut index, below);
            }
            index.floor(self.base_offset, offset)
        };
        let data = self.data_from(0);
        // The record hopped over last: if the hop lands on garbage, its
        // length field may be what is corrupt, so it is checked then.
        let mut previous: Option<(u64, u64)> = None;
        loop {
            let buf = data.get(pos as usize..).unwrap_or(&[]);
            let invalid = match record::peek(buf) {
                Ok(h) if h.offset == at_offset => None,
                Ok(_) => Some(Invalid::WrongOffset),
                Err(invalid) => Some(invalid),
            };
            if let Some(invalid) = invalid {
                if let Some((prev_pos, prev_offset)) = previous
                    && let Err(prev_invalid) = record::check(&data[prev_pos as usize..], prev_offset)
                {
                    return Err(Hop { pos: prev_pos, expected_offset: prev_offset, invalid: prev_invalid });
                }
                return Err(Hop { pos, expected_offset: at_offset, invalid });
            }
            if at_offset == offset {
                return Ok(pos);
            }
            let len = record::peek(buf).expect("checked above").len;
            previous = Some((pos, at_offset));
            pos += record::padded(u64::from(len));
            at_offset += 1;
        }
    }

    /// Whether [`Segment::locate`] of `offset` is cheap now (at most one
    /// index interval of hops): the index is built and covers `offset`.
    pub(crate) fn is_indexed_for(&self, offset: u64) -> bool {
        let index = self.index.lock();
        index.complete && index.unindexed_below.is_none_or(|below| offset >= below)
    }

    /// The position just past the record `last`, which must be the last
    /// record this (sealed) segment holds, found from the end of the file
    /// without the index: the last non-zero byte lies inside that record
    /// (past it there are only its zero padding and the segment's zero
    /// tail, contract 4), so the record starts at most `record_size_max`
    /// bytes before it. Scans up from that bound at the record alignment
    /// for the first position holding a record that carries offset `last`,
    /// covers the last non-zero byte and passes the full check (CRC
    /// included; the lowest match, so a record copied inside a payload is
    /// not mistaken for it). `None` when the tail does not look like that
    /// (the zero tail is longer than `record_size_max`, as in a segment
    /// that records lost at its end leave short, or the record is damaged):
    /// the caller falls back to the index. Cost: reads at most
    /// `2 × padded(record_size_max)` bytes at the end of the file.
    pub(crate) fn end_from_tail(&self, last: u64, record_size_max: u64) -> Option<u64> {
        let data: &[u8] = self.raw_from(0);
        let window = record::padded(record_size_max);
        let size = data.len() as u64;
        let zeros_from = size.saturating_sub(window).max(SEGMENT_HEADER_SIZE);
        let q = zeros_from + data[zeros_from as usize..].iter().rposition(|&b| b != 0)? as u64;
        let lowest = (q + 1).saturating_sub(window).max(SEGMENT_HEADER_SIZE);
        let mut pos = lowest.div_ceil(crate::limits::RECORD_ALIGN) * crate::limits::RECORD_ALIGN;
        while pos <= q {
            let buf = &data[pos as usize..];
            if let Ok(header) = record::peek(buf)
                && header.offset == last
                && pos + u64::from(header.len) > q
                && record::check(buf, last).is_ok()
            {
                let end = pos + record::padded(u64::from(header.len));
                return (end <= size).then_some(end);
            }
            pos += crate::limits::RECORD_ALIGN;
        }
        None
    }

    /// The position just past the record at `pos` (found by
    /// [`Segment::locate`]), or `None` if its length is implausible (below
    /// a record header, or the record with its padding runs past the
    /// written data). No CRC check.
    pub(crate) fn end_of_record_at(&self, pos: u64) -> Option<u64> {
        let data = self.data_from(pos);
        let header = record::peek(&data).ok()?;
        let end = pos + record::padded(u64::from(header.len));
        (end <= pos + data.len() as u64).then_some(end)
    }

    fn build_index(&self, index: &mut SparseIndex, end_offset: u64) {
        let mut fresh = self.index_from_start(end_offset);
        if fresh.entries.is_empty() {
            fresh.push(self.base_offset, self.base_offset, SEGMENT_HEADER_SIZE);
        }
        index.entries = fresh.entries;
        index.last_indexed_pos = fresh.last_indexed_pos;
        index.complete = true;
    }

    /// Indexes the records below `end_offset` (the trusted prefix left by
    /// recovery) and merges the entries with those already held.
    fn index_prefix(&self, index: &mut SparseIndex, end_offset: u64) {
        let prefix = self.index_from_start(end_offset);
        if index.entries.is_empty() {
            index.last_indexed_pos = prefix.last_indexed_pos;
        }
        let mut entries = prefix.entries;
        entries.append(&mut index.entries);
        entries.sort_unstable_by_key(|&(rel, _)| rel);
        entries.dedup_by_key(|&mut (rel, _)| rel);
        index.entries = entries;
        index.unindexed_below = None;
    }

    /// The sparse index of the records from the segment's start up to
    /// `end_offset` (or the first record that does not follow), by hopping
    /// over their headers without CRC checks: one entry per
    /// `INDEX_INTERVAL_BYTES`.
    fn index_from_start(&self, end_offset: u64) -> SparseIndex {
        let data = self.data_from(0);
        let mut index = SparseIndex::default();
        let mut pos = SEGMENT_HEADER_SIZE;
        let mut offset = self.base_offset;
        while offset < end_offset {
            let Ok(header) = record::peek(data.get(pos as usize..).unwrap_or(&[])) else {
                break;
            };
            if header.offset != offset {
                break;
            }
            if index.entries.is_empty() || pos >= index.last_indexed_pos + INDEX_INTERVAL_BYTES {
                index.push(self.base_offset, offset, pos);
            }
            pos += record::padded(u64::from(header.len));
            offset += 1;
        }
        index
    }

    /// Adds an index entry after resynchronising past a corrupt range, so
    /// later reads skip it.
    pub(crate) fn index_resync_point(&self, offset: u64, pos: u64) {
        let mut index = self.index.lock();
        let rel = u32::try_from(offset - self.base_offset).expect("offsets in a segment fit u32");
        let at = index.entries.partition_point(|&(r, _)| r < rel);
        if index.entries.get(at).is_none_or(|&(r, _)| r != rel) {
            let pos32 = u32::try_from(pos).expect("segment positions fit u32");
            index.entries.insert(at, (rel, pos32));
            if at + 1 == index.entries.len() {
                index.last_indexed_pos = pos;
            }
        }
    }

    pub(crate) fn index_len(&self) -> usize {
        self.index.lock().entries.len()
    }
}

/// The allocation after growing from `allocated` to hold `end` bytes: the
/// first step (`SEGMENT_GROWTH_STEP_MIN`) doubled until it covers both,
/// capped at the segment `size`. Lengths stay on that grid even when a crash
/// left the file at a length between two steps.
pub(crate) fn next_allocation(allocated: u64, end: u64, size: u64) -> u64 {
    let mut target = SEGMENT_GROWTH_STEP_MIN;
    while target < end.max(allocated) {
        target = target.saturating_mul(2);
    }
    target.min(size)
}

/// Where and why hopping from record to record stopped before the target.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hop {
    pub pos: u64,
    pub expected_offset: u64,
    pub invalid: Invalid,
}

impl SparseIndex {
    fn push(&mut self, base_offset: u64, offset: u64, pos: u64) {
        let rel = u32::try_from(offset - base_offset).expect("offsets in a segment fit u32");
        let pos32 = u32::try_from(pos).expect("segment positions fit u32");
        debug_assert!(self.entries.last().is_none_or(|&(r, _)| r < rel));
        self.entries.push((rel, pos32));
        self.last_indexed_pos = pos;
    }

    /// The indexed record at or before `offset`: `(offset, position)`.
    fn floor(&self, base_offset: u64, offset: u64) -> (u64, u64) {
        let rel = offset - base_offset;
        let at = self.entries.partition_point(|&(r, _)| u64::from(r) <= rel);
        match at.checked_sub(1).map(|i| self.entries[i]) {
            Some((r, pos)) => (base_offset + u64::from(r), u64::from(pos)),
            None => (base_offset, SEGMENT_HEADER_SIZE),
        }
    }
}

/// Searches forward from `pos` (exclusive) up to `search_end` (inclusive)
/// for the next valid record in `data` whose offset lies in
/// `(after_offset, end_offset)`. Returns its position and offset. Used to
/// step over a corrupt range.
pub(crate) fn resync(data: &[u8], pos: u64, search_end: u64, after_offset: u64, end_offset: u64) -> Option<(u64, u64)> {
    let mut candidate = pos + crate::limits::RECORD_ALIGN;
    while candidate <= search_end && (candidate as usize) < data.len() {
        let buf = &data[candidate as usize..];
        if let Ok(header) = record::peek(buf)
            && header.offset > after_offset
            && header.offset < end_offset
            && record::check(buf, header.offset).is_ok()
        {
            return Some((candidate, header.offset));
        }
        candidate += crate::limits::RECORD_ALIGN;
    }
    None
}

#[cfg(test)]
mod tests;
