//! The disk's own floor for a durable publish, measured in the same run as
//! the brokers: sequential 4 KiB writes, each followed by `fdatasync`, in
//! a file beside the brokers' data (what `fio --rw=write --bs=4k
//! --fdatasync=1` measures). Issue #18 states its latency target relative
//! to this figure's p99.

use std::{
    io::{Seek, SeekFrom, Write},
    path::Path,
    time::Instant,
};

use anyhow::Context;

use crate::load;

/// Bytes per write, as the fio job.
const WRITE_SIZE: usize = 4096;

/// The probe file's size; writes wrap to its start past it, so the probe
/// takes this much disk at most.
const FILE_SIZE: u64 = 16 * 1024 * 1024;

/// `count` write + `fdatasync` pairs on a file in `dir` (removed after);
/// returns the latency of each pair (microseconds).
pub fn fdatasync_latency(dir: &Path, count: u64) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("fdatasync-probe-{}", std::process::id()));
    let result = probe(&path, count);
    let _ = std::fs::remove_file(&path);
    result
}

fn probe(path: &Path, count: u64) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let block = vec![0xa5u8; WRITE_SIZE];
    let mut histogram = load::histogram();
    let mut offset = 0u64;
    for _ in 0..count {
        if offset + WRITE_SIZE as u64 > FILE_SIZE {
            offset = 0;
            file.seek(SeekFrom::Start(0))?;
        }
        let start = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        histogram.record(start.elapsed().as_micros().max(1) as u64)?;
        offset += WRITE_SIZE as u64;
    }
    Ok(histogram)
}
