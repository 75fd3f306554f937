//! The checkpoint: a known-durable point of a log, so recovery scans only
//! what was written after it.
//!
//! The file holds two 64-byte slots written alternately, each
//! `magic, u64 sequence, u64 segment_base, u64 position, u64 next_offset,
//! u64 keys_len, u32 crc over the first 48 bytes`. Recovery takes the valid
//! slot with the highest sequence, so a torn checkpoint write falls back to
//! the previous one.

use std::{fs::File, io, os::unix::fs::FileExt, path::Path};

use crate::file::{self, Io};

const MAGIC: [u8; 8] = *b"BLSTCKP\0";
const SLOT_SIZE: u64 = 64;
pub(crate) const FILE_NAME: &str = "checkpoint";

/// A durable point: every record before `position` in segment
/// `segment_base` (and every earlier segment) was synced, the next record
/// gets `next_offset`, and the key journal's first `keys_len` bytes were
/// synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Point {
    pub segment_base: u64,
    pub position: u64,
    pub next_offset: u64,
    pub keys_len: u64,
}

#[derive(Debug)]
pub(crate) struct Checkpoint {
    file: File,
    sequence: u64,
}

impl Checkpoint {
    pub(crate) fn open(io: &Io, dir: &Path) -> io::Result<(Checkpoint, Option<Point>)> {
        let path = dir.join(FILE_NAME);
        let (file, created) = file::open_or_create(&path)?;
        if created {
            io.sync_dir(dir)?;
        }
        let mut best: Option<(u64, Point)> = None;
        let mut slot = [0u8; SLOT_SIZE as usize];
        for index in 0..2 {
            if file.read_exact_at(&mut slot, index * SLOT_SIZE).is_err() {
                continue;
            }
            if let Some((sequence, point)) = decode(&slot)
                && best.is_none_or(|(s, _)| sequence > s)
            {
                best = Some((sequence, point));
            }
        }
        let sequence = best.map_or(0, |(s, _)| s);
        Ok((Checkpoint { file, sequence }, best.map(|(_, p)| p)))
    }

    /// Writes `point` into the older slot and syncs it.
    pub(crate) fn write(&mut self, io: &Io, point: Point) -> io::Result<()> {
        let sequence = self.sequence + 1;
        let mut slot = [0u8; SLOT_SIZE as usize];
        slot[0..8].copy_from_slice(&MAGIC);
        slot[8..16].copy_from_slice(&sequence.to_le_bytes());
        slot[16..24].copy_from_slice(&point.segment_base.to_le_bytes());
        slot[24..32].copy_from_slice(&point.position.to_le_bytes());
        slot[32..40].copy_from_slice(&point.next_offset.to_le_bytes());
        slot[40..48].copy_from_slice(&point.keys_len.to_le_bytes());
        let crc = crc32fast::hash(&slot[0..48]);
        slot[48..52].copy_from_slice(&crc.to_le_bytes());
        io.append(&self.file, &slot, (sequence % 2) * SLOT_SIZE)?;
        io.sync_data(&self.file)?;
        self.sequence = sequence;
        Ok(())
    }
}

fn decode(slot: &[u8]) -> Option<(u64, Point)> {
    let u64_at = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
    if slot[0..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(slot[48..52].try_into().expect("4 bytes"));
    if crc32fast::hash(&slot[0..48]) != crc {
        return None;
    }
    let point = Point { segment_base: u64_at(16), position: u64_at(24), next_offset: u64_at(32), keys_len: u64_at(40) };
    Some((u64_at(8), point))
}
