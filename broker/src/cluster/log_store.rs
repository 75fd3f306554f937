//! The Raft log on disk (filled in by the log-store work).
