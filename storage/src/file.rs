//! The I/O seam: every write, preallocation and sync of the engine goes
//! through [`Io`], so tests can inject failures (a full disk, a failing
//! fsync) without a special filesystem.
//!
//! Reads go through memory maps and are not part of the seam.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

/// Failures to inject into a log's I/O. Shared by clones; all switches are
/// atomic, so a test can flip them while the log runs.
#[derive(Debug, Default)]
pub struct Faults {
    disk_full: AtomicBool,
    /// The number of successful syncs left before one fails (`u64::MAX`: never).
    syncs_before_failure: AtomicU64,
    /// The number of syncs left to fail, whatever `syncs_before_failure`.
    sync_failures: AtomicU64,
    write_failures: AtomicU64,
    /// The number of directory syncs left to fail.
    dir_sync_failures: AtomicU64,
    /// While set, syncs block (a stalled device) until it is cleared.
    syncs_held: parking_lot::Mutex<bool>,
    syncs_released: parking_lot::Condvar,
    /// Syncs blocked by `hold_syncs` right now.
    syncs_waiting: AtomicU64,
    /// Unit tests only: the next this many segment maps fail with `ENOMEM`.
    #[cfg(test)]
    map_failures: AtomicU64,
    /// Unit tests only: how many operations failed with an injected `ENOSPC`.
    #[cfg(test)]
    pub(crate) disk_full_hits: AtomicU64,
    /// Unit tests only: the inode of every file `sync_data` synced, in order.
    #[cfg(test)]
    pub(crate) synced_inodes: parking_lot::Mutex<Vec<u64>>,
}

impl Faults {
    /// No failures until a switch is set.
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults { syncs_before_failure: AtomicU64::new(u64::MAX), ..Faults::default() })
    }

    /// While set, preallocation and writes that extend files fail with
    /// `ENOSPC`, as on a full disk.
    pub fn set_disk_full(&self, full: bool) {
        self.disk_full.store(full, Ordering::SeqCst);
    }

    /// After `n` more successful syncs, the next sync fails with `EIO`.
    pub fn fail_sync_after(&self, n: u64) {
        self.syncs_before_failure.store(n, Ordering::SeqCst);
    }

    /// The next `n` syncs fail with `EIO` (`u64::MAX`: every sync until
    /// this is called again; 0: none), as on a disk that keeps failing.
    pub fn fail_syncs(&self, n: u64) {
        self.sync_failures.store(n, Ordering::SeqCst);
    }

    /// The next `n` directory syncs (`fsync` of a log's directory: after a
    /// roll, retention, a journal rewrite) fail with `EIO`.
    pub fn fail_dir_syncs(&self, n: u64) {
        self.dir_sync_failures.store(n, Ordering::SeqCst);
    }

    /// The next `n` writes fail with `EIO`.
    pub fn fail_writes(&self, n: u64) {
        self.write_failures.store(n, Ordering::SeqCst);
    }

    /// While `held`, every sync of a log using these faults blocks, as on a
    /// device whose flush stalls, until called again with `false`.
    pub fn hold_syncs(&self, held: bool) {
        *self.syncs_held.lock() = held;
        if !held {
            self.syncs_released.notify_all();
        }
    }

    /// How many syncs are blocked by [`Faults::hold_syncs`] right now.
    pub fn syncs_waiting(&self) -> u64 {
        self.syncs_waiting.load(Ordering::SeqCst)
    }

    /// Unit tests only: the next `n` segment maps fail with `ENOMEM`.
    #[cfg(test)]
    pub(crate) fn fail_maps(&self, n: u64) {
        self.map_failures.store(n, Ordering::SeqCst);
    }
}

/// The I/O operations of the engine, optionally with injected faults.
#[derive(Debug, Clone, Default)]
pub(crate) struct Io {
    faults: Option<Arc<Faults>>,
    /// The descriptor cache every file of the log is reached through.
    files: crate::file_cache::FileCache,
}

impl Io {
    pub(crate) fn new(faults: Option<Arc<Faults>>, files: crate::file_cache::FileCache) -> Io {
        Io { faults, files }
    }

    /// The descriptor cache.
    pub(crate) fn files(&self) -> &crate::file_cache::FileCache {
        &self.files
    }

    fn disk_full(&self) -> io::Result<()> {
        match &self.faults {
            Some(f) if f.disk_full.load(Ordering::SeqCst) => {
                #[cfg(test)]
                f.disk_full_hits.fetch_add(1, Ordering::SeqCst);
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            _ => Ok(()),
        }
    }

    /// Called before a segment file is mapped, so unit tests can make the
    /// map fail.
    pub(crate) fn before_map(&self) -> io::Result<()> {
        #[cfg(test)]
        if let Some(f) = &self.faults
            && f.map_failures.load(Ordering::SeqCst) > 0
        {
            f.map_failures.fetch_sub(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(())
    }

    /// Reserves real blocks for `[from, to)` of `file` (no sparse file),
    /// growing it to `to` if it is shorter, so a full disk is an error here
    /// rather than a SIGBUS when the map is read.
    pub(crate) fn preallocate(&self, file: &File, from: u64, to: u64) -> io::Result<()> {
        debug_assert!(from <= to);
        self.disk_full()?;
        let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
        let offset = libc::off_t::try_from(from).map_err(invalid)?;
        let len = libc::off_t::try_from(to - from).map_err(invalid)?;
        // SAFETY: `fallocate` only reads its integer arguments; the fd is
        // valid for the lifetime of `file`.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // Filesystems without fallocate: write real zeros instead.
            return write_zeros(file, from, to);
        }
        Err(err)
    }

    pub(crate) fn write_at(&self, file: &File, buf: &[u8], pos: u64) -> io::Result<()> {
        if let Some(f) = &self.faults
            && f.write_failures.load(Ordering::SeqCst) > 0
        {
            f.write_failures.fetch_sub(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        file.write_all_at(buf, pos)
    }

    /// Appends to a file that grows (ack and key journals).
    pub(crate) fn append(&self, file: &File, buf: &[u8], pos: u64) -> io::Result<()> {
        self.disk_full()?;
        self.write_at(file, buf, pos)
    }

    /// `fdatasync`: the file's data (and the metadata needed to read it) is
    /// on stable storage when this returns.
    pub(crate) fn sync_data(&self, file: &File) -> io::Result<()> {
        if let Some(f) = &self.faults {
            let mut held = f.syncs_held.lock();
            if *held {
                f.syncs_waiting.fetch_add(1, Ordering::SeqCst);
                while *held {
                    f.syncs_released.wait(&mut held);
                }
                f.syncs_waiting.fetch_sub(1, Ordering::SeqCst);
            }
            drop(held);
            if f.sync_failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let left = f.syncs_before_failure.load(Ordering::SeqCst);
            if left == 0 {
                f.syncs_before_failure.store(u64::MAX, Ordering::SeqCst);
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if left != u64::MAX {
                f.syncs_before_failure.store(left - 1, Ordering::SeqCst);
            }
            #[cfg(test)]
            f.synced_inodes.lock().push(std::os::unix::fs::MetadataExt::ino(&file.metadata()?));
        }
        file.sync_data()
    }

    /// Syncs a directory so that file creations, renames and removals in it
    /// are durable.
    pub(crate) fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let file = File::open(dir)?;
        if let Some(f) = &self.faults {
            if f.dir_sync_failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            #[cfg(test)]
            f.synced_inodes.lock().push(std::os::unix::fs::MetadataExt::ino(&file.metadata()?));
        }
        file.sync_all()
    }
}

/// A tag of the running kernel's boot: CRC32 of
/// `/proc/sys/kernel/random/boot_id`, which changes at every boot; 0 when
/// unknown. A checkpoint records it, and recovery compares it with its own:
/// the same tag means the kernel that held the writer's unsynced pages is
/// still running, so its page cache kept every write (see `recovery`).
pub(crate) fn boot_tag() -> u32 {
    match std::fs::read("/proc/sys/kernel/random/boot_id") {
        Ok(id) if !id.is_empty() => crc32fast::hash(&id).max(1),
        _ => 0,
    }
}

fn write_zeros(file: &File, mut pos: u64, end: u64) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// When a journal rewrite (compaction) that a full disk stopped may be
/// tried again: not before `COMPACTION_RETRY_MS` (a compaction rewrites the
/// whole journal, so it is not retried on every flush).
#[derive(Debug, Default)]
pub(crate) struct CompactionBackoff {
    until: Option<std::time::Instant>,
}

impl CompactionBackoff {
    /// Whether a compaction may run now.
    pub(crate) fn ready(&self) -> bool {
        self.until.is_none_or(|at| std::time::Instant::now() >= at)
    }

    /// No compaction for `COMPACTION_RETRY_MS`.
    pub(crate) fn defer(&mut self) {
        let retry = std::time::Duration::from_millis(crate::limits::COMPACTION_RETRY_MS);
        self.until = Some(std::time::Instant::now() + retry);
    }
}

/// How replacing a journal by a rewritten copy ([`replace`]) failed.
#[derive(Debug)]
pub(crate) enum ReplaceError {
    /// Before the rename: the journal is as it was and the temporary copy
    /// is removed, so the rewrite can simply be tried again later (a full
    /// disk is the case that matters).
    Untouched(io::Error),
    /// At or after the rename: what the directory holds is not known until
    /// recovery reads it again.
    Unknown(io::Error),
}

impl ReplaceError {
    /// A full disk stopped the rewrite before it touched the journal.
    pub(crate) fn is_deferrable(&self) -> bool {
        matches!(self, ReplaceError::Untouched(e) if e.raw_os_error() == Some(libc::ENOSPC))
    }

    pub(crate) fn into_io(self) -> io::Error {
        match self {
            ReplaceError::Untouched(e) | ReplaceError::Unknown(e) => e,
        }
    }
}

/// Replaces `dir/name` by a file holding `bytes`: writes `dir/tmp_name`,
/// syncs it, renames it over `name` and syncs the directory. Returns the
/// new file.
pub(crate) fn replace(io: &Io, dir: &Path, tmp_name: &str, name: &str, bytes: &[u8]) -> Result<File, ReplaceError> {
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let written = open_rw(&tmp, true).and_then(|file| {
        io.append(&file, bytes, 0)?;
        io.sync_data(&file)?;
        Ok(file)
    });
    let file = match written {
        Ok(file) => file,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(ReplaceError::Untouched(e));
        }
    };
    std::fs::rename(&tmp, dir.join(name)).map_err(ReplaceError::Unknown)?;
    io.sync_dir(dir).map_err(ReplaceError::Unknown)?;
    Ok(file)
}

pub(crate) fn open_rw(path: &Path, create_new: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if create_new {
        options.create_new(true);
    }
    options.open(path)
}

pub(crate) fn open_or_create(path: &Path) -> io::Result<(File, bool)> {
    match open_rw(path, true) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok((open_rw(path, false)?, false)),
        Err(e) => Err(e),
    }
}
