//! The Raft log on disk (placeholder until the log-store work lands).
#![allow(dead_code, unused)]
use std::path::Path;
pub struct LogStore;
impl LogStore {
    pub fn open(_dir: &Path) -> std::io::Result<LogStore> { Err(std::io::Error::other("not built yet")) }
}
