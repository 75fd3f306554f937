//! A bounded cache of open file descriptors shared by logs, like RocksDB's
//! `max_open_files`: a log's files (segments, journals, checkpoint) are
//! reached through a [`CachedFile`], which reopens its path when the cache
//! closed its descriptor to make room for another file.
//!
//! Rules:
//! 1. The cache holds at most `capacity` descriptors. An operation in
//!    progress keeps its descriptor open until it ends even if evicted
//!    meanwhile, so the process can briefly hold a few more (one per
//!    concurrent operation).
//! 2. Reads of segments go through their maps, which stay valid without a
//!    descriptor: a sealed, synced segment needs none at all
//!    ([`CachedFile::close`]); its slot goes back to the cache.
//! 3. A file replaced by a rename (journal compaction) is put in the cache
//!    under its handle at once ([`CachedFile::replace`]), so the handle never
//!    reaches the old inode again.
//! 4. Closing a descriptor with dirty pages loses nothing: the pages belong
//!    to the file, and the next `fdatasync` through a new descriptor writes
//!    them. A writeback error that happened while no descriptor was open is
//!    still reported by that `fdatasync` (Linux ≥ 4.16 reports an unseen
//!    writeback error to a descriptor opened after it), so the log is
//!    poisoned as it would be with one descriptor kept open.

use std::{
    borrow::Cow,
    collections::HashMap,
    fmt,
    fs::File,
    io,
    path::Path,
    sync::{Arc, OnceLock},
};

use parking_lot::Mutex;

use crate::{
    file,
    limits::{OPEN_FILES_DEFAULT, OPEN_FILES_MAX, OPEN_FILES_MIN},
};

/// A handle on a descriptor cache. Clones share the cache.
#[derive(Clone)]
pub struct FileCache {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Open descriptors by handle id, with the tick of their last use.
    open: HashMap<u64, (Arc<File>, u64)>,
    tick: u64,
    next_id: u64,
    /// Descriptors opened again after an eviction, since the cache was made.
    reopened: u64,
}

/// Where a cached file lives, kept to reopen it after an eviction: its own
/// path, or a fixed name in a directory whose path the log's files share
/// (a lane holds one copy of its directory's path, not one per file; at
/// tens of thousands of lanes the copies are megabytes).
#[derive(Debug, Clone)]
pub(crate) enum FilePath {
    Own(Arc<Path>),
    InDir(Arc<Path>, &'static str),
}

impl FilePath {
    fn path(&self) -> Cow<'_, Path> {
        match self {
            FilePath::Own(path) => Cow::Borrowed(path),
            FilePath::InDir(dir, name) => Cow::Owned(dir.join(name)),
        }
    }
}

/// One file reached through the cache.
pub(crate) struct CachedFile {
    id: u64,
    path: FilePath,
    cache: FileCache,
}

impl fmt::Debug for FileCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileCache").field("capacity", &self.inner.capacity).finish()
    }
}

impl fmt::Debug for CachedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedFile").field("path", &self.path).finish()
    }
}

impl Default for FileCache {
    fn default() -> FileCache {
        FileCache::new(OPEN_FILES_DEFAULT)
    }
}

impl FileCache {
    /// A cache of at most `capacity` descriptors, clamped to
    /// `OPEN_FILES_MIN..=OPEN_FILES_MAX`.
    pub fn new(capacity: usize) -> FileCache {
        let capacity = capacity.clamp(OPEN_FILES_MIN, OPEN_FILES_MAX);
        FileCache { inner: Arc::new(Inner { capacity, state: Mutex::new(State::default()) }) }
    }

    /// The process-wide cache of the default capacity
    /// ([`OPEN_FILES_DEFAULT`]), used by logs opened without one.
    pub fn shared() -> FileCache {
        static SHARED: OnceLock<FileCache> = OnceLock::new();
        SHARED.get_or_init(FileCache::default).clone()
    }

    /// The most descriptors the cache holds.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Descriptors the cache holds now.
    pub fn open_count(&self) -> usize {
        self.inner.state.lock().open.len()
    }

    /// Descriptors opened again after the cache had closed them: a figure
    /// of how much the cache thrashes.
    pub fn reopened(&self) -> u64 {
        self.inner.state.lock().reopened
    }

    /// Takes `file`, open on `path`, into the cache.
    pub(crate) fn insert(&self, path: FilePath, file: File) -> CachedFile {
        let mut state = self.inner.state.lock();
        state.next_id += 1;
        let id = state.next_id;
        self.put(&mut state, id, Arc::new(file));
        CachedFile { id, path, cache: self.clone() }
    }

    /// Puts a descriptor in, evicting the least recently used ones past
    /// the capacity (rule 1).
    fn put(&self, state: &mut State, id: u64, file: Arc<File>) {
        state.tick += 1;
        let tick = state.tick;
        state.open.insert(id, (file, tick));
        while state.open.len() > self.inner.capacity {
            let oldest = state
                .open
                .iter()
                .filter(|&(&other, _)| other != id)
                .min_by_key(|(_, (_, tick))| *tick)
                .map(|(&other, _)| other);
            match oldest {
                Some(oldest) => state.open.remove(&oldest),
                None => break,
            };
        }
    }
}

impl CachedFile {
    /// The open descriptor, opened again if the cache closed it.
    pub(crate) fn get(&self) -> io::Result<Arc<File>> {
        let cache = &self.cache;
        {
            let mut state = cache.inner.state.lock();
            state.tick += 1;
            let tick = state.tick;
            if let Some((file, used)) = state.open.get_mut(&self.id) {
                *used = tick;
                return Ok(Arc::clone(file));
            }
        }
        // Opened without the lock: another log's files stay reachable.
        let file = Arc::new(file::open_rw(&self.path.path(), false)?);
        let mut state = cache.inner.state.lock();
        if let Some((existing, _)) = state.open.get(&self.id) {
            return Ok(Arc::clone(existing));
        }
        state.reopened += 1;
        cache.put(&mut state, self.id, Arc::clone(&file));
        Ok(file)
    }

    /// Closes the descriptor now (rule 2); a later [`CachedFile::get`]
    /// opens the path again.
    pub(crate) fn close(&self) {
        self.cache.inner.state.lock().open.remove(&self.id);
    }

    /// `file` was renamed over this handle's path: it replaces the
    /// descriptor (rule 3).
    pub(crate) fn replace(&self, file: File) {
        let mut state = self.cache.inner.state.lock();
        self.cache.put(&mut state, self.id, Arc::new(file));
    }
}

impl Drop for CachedFile {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache holds at most its capacity, closing the least recently
    /// used descriptor; a handle whose descriptor was closed opens its path
    /// again and reads the same file.
    #[test]
    fn evicts_the_least_recently_used_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::new(OPEN_FILES_MIN);
        let files: Vec<CachedFile> = (0..OPEN_FILES_MIN + 1)
            .map(|i| {
                let path = dir.path().join(i.to_string());
                std::fs::write(&path, i.to_string()).unwrap();
                cache.insert(FilePath::Own(Arc::from(path.as_path())), file::open_rw(&path, false).unwrap())
            })
            .collect();
        assert_eq!(cache.open_count(), OPEN_FILES_MIN, "at the capacity, one past it evicted");
        assert_eq!(cache.reopened(), 0);
        let mut buf = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&*files[0].get().unwrap(), &mut buf, 0).unwrap();
        assert_eq!(&buf, b"0", "the evicted file, reopened by path");
        assert_eq!(cache.reopened(), 1);
        assert_eq!(cache.open_count(), OPEN_FILES_MIN);
        files[5].close();
        assert_eq!(cache.open_count(), OPEN_FILES_MIN - 1);
        drop(files);
        assert_eq!(cache.open_count(), 0, "a dropped handle closes its descriptor");
    }

    /// A capacity below the floor or above the ceiling is clamped to it.
    #[test]
    fn capacity_at_its_limits_and_one_past() {
        assert_eq!(FileCache::new(OPEN_FILES_MIN).capacity(), OPEN_FILES_MIN);
        assert_eq!(FileCache::new(OPEN_FILES_MIN - 1).capacity(), OPEN_FILES_MIN);
        assert_eq!(FileCache::new(OPEN_FILES_MAX).capacity(), OPEN_FILES_MAX);
        assert_eq!(FileCache::new(OPEN_FILES_MAX + 1).capacity(), OPEN_FILES_MAX);
    }
}
