//! The checkpoint: a known-durable point of a log, so recovery scans only
//! what was written after it.
//!
//! The file holds two 64-byte slots written alternately, each
//! `magic, u64 sequence, u64 segment_base, u64 position, u64 next_offset,
//! u64 keys_len, u32 crc over the first 48 bytes`, then the *tail extension*
//! `u32 flags, u32 boot_tag, u32 crc over the first 60 bytes`. Recovery takes
//! the valid slot with the highest sequence, so a torn checkpoint write falls
//! back to the previous one.
//!
//! The extension tells recovery how much of the segment past `position` it
//! must look at (see `recovery`). It is optional, so the format stays
//! version 1 both ways: builds before it wrote zeros there, whose extension
//! CRC does not match, so the slot reads as "not clean, unknown boot" (a full
//! search of the tail, as those builds always did); and those builds never
//! read bytes 52..64.

use crate::file_cache::FilePath;
use std::sync::Arc;
use std::{io, os::unix::fs::FileExt, path::Path};

use crate::{
    file::{self, Io},
    file_cache::CachedFile,
};

const MAGIC: [u8; 8] = *b"BLSTCKP\0";
const SLOT_SIZE: u64 = 64;
pub(crate) const FILE_NAME: &str = "checkpoint";
/// Flag: written by a clean close (see [`Recorded::clean`]).
const FLAG_CLEAN: u32 = 1;

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

/// The checkpoint recovery starts from, as read from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Recorded {
    pub point: Point,
    /// Written by a clean close: nothing was written past `position` in its
    /// segment after the bytes there were last made zero on stable storage,
    /// no later segment was created, and no writer followed (every open
    /// writes a checkpoint that is not clean before it appends).
    pub clean: bool,
    /// [`file::boot_tag`] of the kernel that ran the writer; 0 when unknown.
    pub boot_tag: u32,
}

#[derive(Debug)]
pub(crate) struct Checkpoint {
    file: CachedFile,
    sequence: u64,
    /// The running kernel's boot tag, written into every slot.
    boot_tag: u32,
    /// File length: a slot write below it overwrites allocated bytes and
    /// cannot run out of space; one past it grows the file.
    len: u64,
}

impl Checkpoint {
    pub(crate) fn open(io: &Io, dir: impl Into<Arc<Path>>) -> io::Result<(Checkpoint, Option<Recorded>)> {
        let dir: Arc<Path> = dir.into();
        let path = dir.join(FILE_NAME);
        let (file, created) = file::open_or_create(&path)?;
        if created {
            io.sync_dir(&dir)?;
        }
        let mut best: Option<(u64, Recorded)> = None;
        let mut slot = [0u8; SLOT_SIZE as usize];
        for index in 0..2 {
            if file.read_exact_at(&mut slot, index * SLOT_SIZE).is_err() {
                continue;
            }
            if let Some((sequence, recorded)) = decode(&slot)
                && best.is_none_or(|(s, _)| sequence > s)
            {
                best = Some((sequence, recorded));
            }
        }
        let sequence = best.map_or(0, |(s, _)| s);
        let len = file.metadata()?.len();
        let file = io.files().insert(FilePath::InDir(dir, FILE_NAME), file);
        Ok((Checkpoint { file, sequence, boot_tag: file::boot_tag(), len }, best.map(|(_, r)| r)))
    }

    /// The running kernel's boot tag (0 when unknown).
    pub(crate) fn boot_tag(&self) -> u32 {
        self.boot_tag
    }

    /// Writes `point` into the older slot and syncs it. `clean` only from a
    /// clean close, with `point` at the exact end of the log (see
    /// [`Recorded::clean`]).
    pub(crate) fn write(&mut self, io: &Io, point: Point, clean: bool) -> io::Result<()> {
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
        let flags = if clean { FLAG_CLEAN } else { 0 };
        slot[52..56].copy_from_slice(&flags.to_le_bytes());
        slot[56..60].copy_from_slice(&self.boot_tag.to_le_bytes());
        let extension_crc = crc32fast::hash(&slot[0..60]);
        slot[60..64].copy_from_slice(&extension_crc.to_le_bytes());
        let pos = (sequence % 2) * SLOT_SIZE;
        let file = self.file.get()?;
        if pos + SLOT_SIZE <= self.len {
            io.write_at(&file, &slot, pos)?;
        } else {
            io.append(&file, &slot, pos)?;
        }
        io.sync_data(&file)?;
        self.sequence = sequence;
        self.len = self.len.max(pos + SLOT_SIZE);
        Ok(())
    }
}

fn decode(slot: &[u8]) -> Option<(u64, Recorded)> {
    let u32_at = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
    if slot[0..8] != MAGIC {
        return None;
    }
    if crc32fast::hash(&slot[0..48]) != u32_at(48) {
        return None;
    }
    let point = Point { segment_base: u64_at(16), position: u64_at(24), next_offset: u64_at(32), keys_len: u64_at(40) };
    // Without a valid extension (an older build, or a torn write of it),
    // assume the least: not clean, unknown boot.
    let extension = (crc32fast::hash(&slot[0..60]) == u32_at(60)).then(|| (u32_at(52), u32_at(56)));
    let (flags, boot_tag) = extension.unwrap_or((0, 0));
    Some((u64_at(8), Recorded { point, clean: flags & FLAG_CLEAN != 0, boot_tag }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(next_offset: u64) -> Point {
        Point { segment_base: 0, position: 64 + 8 * next_offset, next_offset, keys_len: 16 }
    }

    /// The latest slot wins, with its tail extension; a slot written by an
    /// older build (zeros past the first CRC) still reads, as not clean and
    /// of an unknown boot.
    #[test]
    fn slots_alternate_and_the_extension_is_optional() {
        let dir = tempfile::tempdir().unwrap();
        let io = Io::default();
        let (mut checkpoint, recorded) = Checkpoint::open(&io, dir.path()).unwrap();
        assert_eq!(recorded, None);
        checkpoint.write(&io, point(1), false).unwrap();
        checkpoint.write(&io, point(2), true).unwrap();
        let (_, recorded) = Checkpoint::open(&io, dir.path()).unwrap();
        let recorded = recorded.unwrap();
        assert_eq!(recorded.point, point(2));
        assert!(recorded.clean);
        assert_eq!(recorded.boot_tag, file::boot_tag());

        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[52..64].fill(0); // slot 0 holds sequence 2
        std::fs::write(&path, &bytes).unwrap();
        let (_, recorded) = Checkpoint::open(&io, dir.path()).unwrap();
        assert_eq!(recorded, Some(Recorded { point: point(2), clean: false, boot_tag: 0 }));
    }
}
