//! Kill -9 crash test: every record a child process saw become durable is
//! still there, intact, after the child is SIGKILLed and the log reopened.
//!
//! The test binary runs itself again as a child (`BALLAST_CRASH_CHILD=<dir>`).
//! The child opens the log in `<dir>` under [`SyncPolicy::Fsync`] with
//! small segments that grow in two steps, appends from several threads in batches of
//! varied sizes (payloads, keys and headers of varied sizes), sometimes acks
//! a range of its own records, and prints one line per record once its commit
//! has resolved. The parent kills it at a random moment (sometimes during its
//! recovery, usually while it appends), reopens the log and checks:
//! 1. every reported-durable record reads back with the same offset, content
//!    digest and payload size, and no read of one reports it corrupt;
//! 2. a cursor from the start yields every reported-durable record not acked,
//!    in order, and meets no corrupt range at all (recovery must have cut
//!    every torn write);
//! 3. `next_offset` is above every reported-durable offset, and no offset is
//!    reported durable twice (an offset is never reused after recovery);
//! 4. acks whose commit resolved are still done; records never acked are not
//!    done (not quarantined); only acked records may be removed by retention;
//! 5. the idempotency keys of reported-durable records are recovered;
//! 6. a roll cut by the kill (the spare, the inline roll's `roll.tmp`, a
//!    segment renamed from a spare before its header was written) leaves
//!    nothing behind after recovery, and nothing is set aside as `.corrupt`.
//!    The summary counts the kills that left each of those states.
//!
//! Then the parent sometimes acks a prefix (so retention removes segments and
//! the ack journal and checkpoint are rewritten), closes the log, and runs
//! the next cycle on the same directory: recovery always runs on a log with
//! history, written by several earlier processes.
//!
//! What a pass shows, for the kill moments it tried: no commit resolved
//! before its data was written where recovery finds it, recovery after an
//! abrupt process death keeps everything committed, and nothing recovery or
//! retention does destroys committed data or acks. It is sampling, not
//! proof: a bug in a narrow window shows up only when a kill lands in it.
//!
//! What it does not prove: that `fdatasync` is called at the right moments.
//! SIGKILL ends the process but not the kernel: the page cache survives, so
//! written-but-unsynced data survives too, and a missing sync goes unnoticed.
//! Losing the page cache needs a power cut: a VM that is reset, or a
//! device-mapper target such as `dm-flakey`/`dm-log-writes` that drops
//! unsynced writes. The fault-injection seam (`tests/it/faults.rs`) and the
//! model test's crash image cover that side in-process.
//!
//! Knobs (environment): `BALLAST_CRASH_CYCLES` (default 50),
//! `BALLAST_CRASH_BUDGET_S` (default 90; the test stops early, with a
//! message, when the time is spent), `BALLAST_TEST_SEED` (replays the kill
//! timings and the children's choices; thread interleaving still varies),
//! `BALLAST_CRASH_DIR` (where the log directory is created),
//! `BALLAST_CRASH_VERBOSE=1` (one line per cycle).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::{BufRead, BufReader, Write as _},
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Command, ExitCode, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ballast_storage::{AckKind, Log, LogOptions, NewRecord, ReadError, Record, SyncPolicy, limits::SEGMENT_SIZE_MIN};
use bytes::Bytes;

/// Set in the child's environment to the log directory it must write.
const CHILD_DIR_ENV: &str = "BALLAST_CRASH_CHILD";
/// Set in the child's environment to the seed of its choices.
const CHILD_SEED_ENV: &str = "BALLAST_CRASH_CHILD_SEED";
const CYCLES_DEFAULT: u64 = 50;
const BUDGET_S_DEFAULT: u64 = 90;
/// Appending threads in the child.
const CHILD_THREADS: u64 = 3;
/// A child that is never killed (its parent died) stops on its own.
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(30);
/// How long the parent waits for a child to open its log.
const CHILD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest encoded record; payloads stay below it with room for key and
/// headers.
const RECORD_SIZE_MAX: u32 = 16 * 1024;
/// Failures printed per cycle; the rest are counted.
const FAILURES_PRINTED_MAX: usize = 20;

fn main() -> ExitCode {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        let seed = std::env::var(CHILD_SEED_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        child(Path::new(&dir), seed);
        return ExitCode::SUCCESS;
    }
    parent()
}

/// The options of every open, in the child and the parent: small segments
/// so batches roll over often, two growth steps each (`SEGMENT_SIZE_MIN`
/// is one) so kills land around segment growth too, by the writer or by
/// the flusher ahead of it, and frequent checkpoints so they land around
/// checkpoint and journal writes.
fn options() -> LogOptions {
    LogOptions {
        segment_size: 2 * SEGMENT_SIZE_MIN,
        record_size_max: RECORD_SIZE_MAX,
        sync_policy: SyncPolicy::Fsync,
        checkpoint_interval_bytes: 16 * 1024,
        ..LogOptions::default()
    }
}

// ---------------------------------------------------------------------------
// Parent

/// What the parent knows about one record a child reported durable.
#[derive(Debug)]
struct Durable {
    /// [`digest`] of the record's content, as the child appended it.
    digest: u32,
    payload_size: usize,
    key: Option<Bytes>,
    ack: Ack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ack {
    /// Never acked: must be readable, yielded by cursors, and not done.
    None,
    /// An ack was issued but the process may have died before it was
    /// durable: the record may or may not be done, and may be removed.
    Issued,
    /// The ack's commit resolved: the record must stay done.
    Durable,
}

/// Every record reported durable and not yet removed by retention.
#[derive(Debug, Default)]
struct Model {
    records: BTreeMap<u64, Durable>,
    /// Highest offset ever reported durable.
    offset_max: Option<u64>,
    reported_count: u64,
    keyed_count: u64,
    /// Reads of reported-durable records checked, over all cycles.
    checked_count: u64,
    /// Kills that left the roll states of [`RollStates`], over all cycles.
    roll_states: RollStates,
}

/// What a kill left of the spare-segment protocol, seen before recovery.
#[derive(Debug, Default, Clone, Copy)]
struct RollStates {
    /// A prepared spare (`spare`).
    spare: u64,
    /// An inline roll's own spare (`roll.tmp`), not renamed yet.
    roll_file: u64,
    /// A `<base>.seg` still holding a spare's header: renamed, header not
    /// written yet.
    spare_headed: u64,
}

impl RollStates {
    /// Looks at `dir` as the kill left it (or, after recovery, as recovery
    /// left it).
    fn of(dir: &Path) -> RollStates {
        let mut states = RollStates::default();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "spare" {
                states.spare += 1;
            } else if name == "roll.tmp" {
                states.roll_file += 1;
            } else if name.ends_with(".seg") {
                let header = std::fs::read(entry.path()).unwrap_or_default();
                // A spare's header: the segment magic, base offset u64::MAX.
                if header.len() >= 24 && header[..8] == *b"BLSTSEG\0" && header[16..24] == [0xFF; 8] {
                    states.spare_headed += 1;
                }
            }
        }
        states
    }

    fn add(&mut self, other: RollStates) {
        self.spare += other.spare;
        self.roll_file += other.roll_file;
        self.spare_headed += other.spare_headed;
    }
}

/// One line of the child's report.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// The child opened the log; the next offset it will assign.
    Ready {
        next_offset: u64,
    },
    Durable {
        offset: u64,
        digest: u32,
        payload_size: usize,
        key: Option<Bytes>,
    },
    /// An ack of `[first, first + count)` is about to be issued.
    Acking {
        first: u64,
        count: u64,
    },
    /// That ack's commit resolved.
    Acked {
        first: u64,
        count: u64,
    },
}

#[derive(Debug)]
struct Settings {
    cycles: u64,
    budget: Duration,
    seed: u64,
    verbose: bool,
}

fn parent() -> ExitCode {
    match filtered() {
        Filter::Run => {}
        Filter::List => {
            println!("crash: test");
            return ExitCode::SUCCESS;
        }
        Filter::Skip => {
            println!("crash: filtered out");
            return ExitCode::SUCCESS;
        }
    }
    let settings = match settings() {
        Ok(s) => s,
        Err(message) => {
            eprintln!("crash: {message}");
            return ExitCode::FAILURE;
        }
    };
    println!("crash: seed {} (replay with BALLAST_TEST_SEED={})", settings.seed, settings.seed);
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("ballast-crash-");
        b
    };
    let dir = match std::env::var_os("BALLAST_CRASH_DIR") {
        Some(base) => builder.tempdir_in(base),
        None => builder.tempdir(),
    };
    let dir = match dir {
        Ok(d) => d,
        Err(e) => {
            eprintln!("crash: creating the log directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("crash: finding the test binary: {e}");
            return ExitCode::FAILURE;
        }
    };

    let started = Instant::now();
    let mut rng = Rng::new(settings.seed);
    let mut model = Model::default();
    let mut cycles_run = 0;
    // Kills that landed before the child had opened (recovered) its log.
    let mut opening_kills = 0;
    let mut failures = Vec::new();
    for cycle in 0..settings.cycles {
        if started.elapsed() >= settings.budget {
            println!(
                "crash: time budget of {} s spent after {cycle} of {} cycles; stopping early",
                settings.budget.as_secs(),
                settings.cycles
            );
            break;
        }
        cycles_run += 1;
        let child_seed = rng.next_u64();
        let kill = if rng.below(5) == 0 {
            // Measured from the spawn: the kill may land in recovery.
            Kill::AfterSpawn(Duration::from_millis(rng.below(30)))
        } else {
            Kill::AfterReady(Duration::from_millis(5 + rng.below(146)))
        };
        let lines = match run_child(&exe, dir.path(), child_seed, kill) {
            Ok(lines) => lines,
            Err(message) => {
                failures.push(format!("cycle {cycle}: {message}"));
                break;
            }
        };
        if !lines.iter().any(|line| matches!(line, Line::Ready { .. })) {
            opening_kills += 1;
        }
        let reported_before = model.reported_count;
        apply(&mut model, &lines, cycle, &mut failures);
        if failures.is_empty() {
            verify_and_ack(dir.path(), &mut model, &mut rng, started, cycle, &mut failures);
        }
        if settings.verbose {
            println!(
                "crash: cycle {cycle} at {:.1} s: {kill:?}, {} lines, {} new durable records, {} tracked",
                started.elapsed().as_secs_f64(),
                lines.len(),
                model.reported_count - reported_before,
                model.records.len()
            );
        }
        if !failures.is_empty() {
            break;
        }
    }

    let elapsed = started.elapsed();
    for failure in failures.iter().take(FAILURES_PRINTED_MAX) {
        eprintln!("crash: FAILURE {failure}");
    }
    if failures.len() > FAILURES_PRINTED_MAX {
        eprintln!("crash: ... and {} more failures", failures.len() - FAILURES_PRINTED_MAX);
    }
    println!(
        "crash: {cycles_run} cycles ({opening_kills} killed while opening), {} durable records checked \
         ({} reported, {} with keys), kills leaving a spare {}, a roll.tmp {}, a spare-headed segment {}, \
         {} failures (seed {}, {:.1} s)",
        model.checked_count,
        model.reported_count,
        model.keyed_count,
        model.roll_states.spare,
        model.roll_states.roll_file,
        model.roll_states.spare_headed,
        failures.len(),
        settings.seed,
        elapsed.as_secs_f64()
    );
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        let kept = dir.keep();
        eprintln!("crash: the log directory is kept for inspection: {}", kept.display());
        ExitCode::FAILURE
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Filter {
    Run,
    List,
    Skip,
}

/// Honours the libtest arguments that `cargo test [FILTER] -- [ARGS]` passes
/// to every test binary, so a filtered run does not pay for this test:
/// `--list`, `--ignored` (this test is not ignored), `--exact`, `--skip`, and
/// name filters. Other flags are accepted and ignored.
fn filtered() -> Filter {
    const NAME: &str = "crash";
    const VALUE_FLAGS: [&str; 6] = ["--test-threads", "--skip", "--format", "--color", "--logfile", "-Z"];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exact = args.iter().any(|a| a == "--exact");
    let matches = |pattern: &str| if exact { pattern == NAME } else { NAME.contains(pattern) };
    let mut filters = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--list" => return Filter::List,
            "--ignored" => return Filter::Skip,
            "--skip" => {
                if args.next().is_some_and(|pattern| matches(pattern)) {
                    return Filter::Skip;
                }
            }
            flag if VALUE_FLAGS.contains(&flag) => {
                args.next();
            }
            flag if flag.starts_with('-') => {}
            filter => filters.push(filter),
        }
    }
    if filters.is_empty() || filters.iter().any(|f| matches(f)) { Filter::Run } else { Filter::Skip }
}

fn settings() -> Result<Settings, String> {
    fn number(name: &str, default: u64) -> Result<u64, String> {
        match std::env::var(name) {
            Ok(value) => value.trim().parse().map_err(|_| format!("{name} must be a number; got {value:?}")),
            Err(_) => Ok(default),
        }
    }
    let time_seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    Ok(Settings {
        cycles: number("BALLAST_CRASH_CYCLES", CYCLES_DEFAULT)?,
        budget: Duration::from_secs(number("BALLAST_CRASH_BUDGET_S", BUDGET_S_DEFAULT)?),
        seed: number("BALLAST_TEST_SEED", time_seed)?,
        verbose: std::env::var_os("BALLAST_CRASH_VERBOSE").is_some_and(|v| v == "1"),
    })
}

/// When the parent sends SIGKILL.
#[derive(Debug, Clone, Copy)]
enum Kill {
    AfterSpawn(Duration),
    AfterReady(Duration),
}

/// Runs one child until the kill and returns every complete line it printed.
/// An `Err` is a failure of the cycle (the child died on its own, or never
/// opened its log).
fn run_child(exe: &Path, dir: &Path, seed: u64, kill: Kill) -> Result<Vec<Line>, String> {
    let mut child = Command::new(exe)
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawning the child: {e}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || read_lines(stdout, &tx));

    let mut lines = Vec::new();
    let wait = match kill {
        Kill::AfterSpawn(delay) => Ok(delay),
        Kill::AfterReady(delay) => match rx.recv_timeout(CHILD_READY_TIMEOUT) {
            Ok(Ok(line @ Line::Ready { .. })) => {
                lines.push(line);
                Ok(delay)
            }
            Ok(Ok(line)) => Err(format!("the child's first line is {line:?}, expected ready")),
            Ok(Err(message)) => Err(message),
            Err(_) => Err("the child did not open its log in time".into()),
        },
    };
    // The sleep is the random moment of the kill, not a wait for a state.
    if let Ok(delay) = wait {
        std::thread::sleep(delay);
    }
    let _ = child.kill();
    let status = child.wait().map_err(|e| format!("waiting for the child: {e}"))?;
    // The child is gone, so its end of the pipe is closed: the reader ends.
    reader.join().map_err(|_| "the reader thread panicked".to_string())?;
    if status.signal() != Some(libc::SIGKILL) {
        return Err(format!("the child ended before the kill: {status}"));
    }
    wait?;
    for line in rx.try_iter() {
        lines.push(line?);
    }
    Ok(lines)
}

/// Reads the child's stdout, sending each complete line parsed. A final line
/// without its newline was cut by the kill and carries no promise: it is
/// dropped.
fn read_lines(stdout: std::process::ChildStdout, tx: &mpsc::Sender<Result<Line, String>>) {
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return,
            Ok(_) if buf.last() != Some(&b'\n') => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf[..buf.len() - 1]);
                let _ = tx.send(parse_line(&text).ok_or_else(|| format!("unreadable line from the child: {text:?}")));
            }
            Err(e) => {
                let _ = tx.send(Err(format!("reading the child's output: {e}")));
                return;
            }
        }
    }
}

fn parse_line(text: &str) -> Option<Line> {
    let mut words = text.split(' ');
    let kind = words.next()?;
    let mut number = || words.next()?.parse::<u64>().ok();
    let line = match kind {
        "ready" => Line::Ready { next_offset: number()? },
        "durable" => {
            let offset = number()?;
            let digest = u32::try_from(number()?).ok()?;
            let payload_size = usize::try_from(number()?).ok()?;
            let key = match words.next()? {
                "-" => None,
                key => Some(Bytes::copy_from_slice(key.as_bytes())),
            };
            Line::Durable { offset, digest, payload_size, key }
        }
        "acking" => Line::Acking { first: number()?, count: number()? },
        "acked" => Line::Acked { first: number()?, count: number()? },
        _ => return None,
    };
    words.next().is_none().then_some(line)
}

/// Folds one child's report into the model.
fn apply(model: &mut Model, lines: &[Line], cycle: u64, failures: &mut Vec<String>) {
    let offset_max_before = model.offset_max;
    for line in lines {
        match line {
            Line::Ready { next_offset } => {
                if let Some(max) = offset_max_before
                    && *next_offset <= max
                {
                    failures.push(format!(
                        "cycle {cycle}: the child opened the log at next offset {next_offset}, \
                         but offset {max} was reported durable before"
                    ));
                }
            }
            Line::Durable { offset, digest, payload_size, key } => {
                let durable =
                    Durable { digest: *digest, payload_size: *payload_size, key: key.clone(), ack: Ack::None };
                if model.records.insert(*offset, durable).is_some()
                    || offset_max_before.is_some_and(|max| *offset <= max)
                {
                    failures.push(format!("cycle {cycle}: offset {offset} was reported durable twice"));
                }
                model.offset_max = model.offset_max.max(Some(*offset));
                model.reported_count += 1;
                model.keyed_count += u64::from(key.is_some());
            }
            Line::Acking { first, count } => set_ack(model, *first, *count, Ack::Issued),
            Line::Acked { first, count } => set_ack(model, *first, *count, Ack::Durable),
        }
    }
}

fn set_ack(model: &mut Model, first: u64, count: u64, ack: Ack) {
    for (_, record) in model.records.range_mut(first..first + count) {
        // An ack issued by the parent after an `Issued` one resolves it.
        if record.ack != Ack::Durable {
            record.ack = ack;
        }
    }
}

/// Reopens the log, checks it against the model, sometimes acks a prefix,
/// and closes it.
fn verify_and_ack(
    dir: &Path,
    model: &mut Model,
    rng: &mut Rng,
    started: Instant,
    cycle: u64,
    failures: &mut Vec<String>,
) {
    model.roll_states.add(RollStates::of(dir));
    let log = match Log::open(dir, options()) {
        Ok(log) => log,
        Err(e) => {
            failures.push(format!("cycle {cycle}: reopening after the kill: {e}"));
            return;
        }
    };
    let mut fail = |message: String| failures.push(format!("cycle {cycle}: {message}"));
    let left = RollStates::of(dir);
    if left.roll_file + left.spare_headed > 0 {
        fail(format!("recovery left a cut roll behind: {left:?}"));
    }
    let set_aside: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".corrupt"))
        .collect();
    if !set_aside.is_empty() {
        fail(format!("a kill made recovery set segments aside: {set_aside:?}"));
    }
    let next_offset = log.next_offset();
    if let Some(max) = model.offset_max
        && next_offset <= max
    {
        fail(format!("next offset is {next_offset} after recovery, but offset {max} was reported durable"));
    }

    // Keys are recovered within the dedupe window and up to a count; stay
    // well inside both.
    let keys_checked =
        started.elapsed() < Duration::from_secs(4 * 60) && model.keyed_count < u64::from(options().dedupe_keys_max / 2);
    let keys: HashMap<Bytes, u64> = log.take_recovered_keys().into_iter().map(|k| (k.key, k.offset)).collect();

    let mut removed = Vec::new();
    for (&offset, record) in &model.records {
        model.checked_count += 1;
        match log.read(offset) {
            Ok(read) => {
                if read.offset != offset || read.payload.len() != record.payload_size || digest(&read) != record.digest
                {
                    fail(format!(
                        "record {offset} changed: read offset {}, {} payload bytes (reported {}), digest {:08x} \
                         (reported {:08x})",
                        read.offset,
                        read.payload.len(),
                        record.payload_size,
                        digest(&read),
                        record.digest
                    ));
                }
            }
            Err(ReadError::Removed { .. }) if record.ack != Ack::None && log.is_done(offset) => removed.push(offset),
            Err(e) => fail(format!("durable record {offset} (ack {:?}): {e}", record.ack)),
        }
        let done = log.is_done(offset);
        match record.ack {
            Ack::Durable if !done => fail(format!("offset {offset} was durably acked but is not done")),
            Ack::None if done => fail(format!("offset {offset} was never acked but is done (quarantined?)")),
            _ => {}
        }
        if keys_checked && let Some(key) = &record.key {
            match keys.get(key) {
                Some(&found) if found == offset => {}
                found => fail(format!(
                    "key {} of durable record {offset} was recovered as {found:?}",
                    String::from_utf8_lossy(key)
                )),
            }
        }
    }
    // Gone for good: later cycles see them below the first offset.
    for offset in removed {
        model.records.remove(&offset);
    }

    // The cursor must yield every durable record not acked, in order, and
    // meet no corrupt range: recovery has run, and a kill tears only the tail.
    let mut expected = model.records.iter().filter(|(_, r)| r.ack == Ack::None).map(|(&o, _)| o).peekable();
    let mut cursor = log.cursor(0);
    let mut previous = None;
    while let Some(next) = cursor.next() {
        match next {
            Ok(read) => {
                if previous.is_some_and(|p| read.offset <= p) {
                    fail(format!("cursor went from offset {previous:?} to {}", read.offset));
                }
                previous = Some(read.offset);
                while let Some(missed) = expected.next_if(|&o| o < read.offset) {
                    fail(format!("cursor skipped durable record {missed}"));
                }
                expected.next_if_eq(&read.offset);
            }
            Err(e) => fail(format!("cursor met a corrupt range after recovery: {e}")),
        }
    }
    for missed in expected {
        fail(format!("cursor ended before durable record {missed}"));
    }

    if failures.is_empty() {
        if let Err(message) = parent_acks(&log, model, rng) {
            failures.push(format!("cycle {cycle}: {message}"));
        }
    }
    if let Err(e) = log.close() {
        failures.push(format!("cycle {cycle}: closing the log: {e}"));
    }
}

/// Half the time, acks everything up to a random distance from the newest
/// durable record (retention then removes segments); sometimes dead-letters
/// one record above the floor (a hole in the ack state).
fn parent_acks(log: &Log, model: &mut Model, rng: &mut Rng) -> Result<(), String> {
    let Some(max) = model.offset_max else {
        return Ok(());
    };
    if rng.below(2) == 0 {
        let floor = log.ack_floor();
        let end = (max + 1).saturating_sub(rng.below(1500));
        if end > floor {
            let commit = log.ack(floor, end - floor, AckKind::Acked).map_err(|e| format!("parent ack: {e}"))?;
            commit.wait().map_err(|e| format!("parent ack commit: {e}"))?;
            set_ack(model, floor, end - floor, Ack::Durable);
        }
    }
    if rng.below(4) == 0 {
        let pending: Vec<u64> = model.records.iter().filter(|(_, r)| r.ack == Ack::None).map(|(&o, _)| o).collect();
        if !pending.is_empty() {
            let offset = pending[rng.below(pending.len() as u64) as usize];
            let commit = log.ack(offset, 1, AckKind::DeadLettered).map_err(|e| format!("parent dead-letter: {e}"))?;
            commit.wait().map_err(|e| format!("parent dead-letter commit: {e}"))?;
            set_ack(model, offset, 1, Ack::Durable);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Child

/// Opens the log, reports `ready`, and appends from several threads until
/// killed. Any error or panic ends the process with a message and a non-zero
/// code, which the parent reports as a failure.
fn child(dir: &Path, seed: u64) {
    // A panic in any thread (ours or the engine's flusher) ends the process
    // at once, so the parent sees it instead of a half-alive child.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(3);
    }));
    let log = match Log::open(dir, options()) {
        Ok(log) => Arc::new(log),
        Err(e) => child_fail(&format!("opening {}: {e}", dir.display())),
    };
    emit(&format!("ready {}\n", log.next_offset()));
    let threads: Vec<_> = (0..CHILD_THREADS)
        .map(|thread| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || child_writer(&log, seed, thread))
        })
        .collect();
    for thread in threads {
        if thread.join().is_err() {
            child_fail("an appending thread panicked");
        }
    }
}

/// One appending thread: append a batch, wait for its commit, report it;
/// now and then ack part of it or force a sync.
fn child_writer(log: &Log, seed: u64, thread: u64) {
    let mut rng = Rng::new(seed ^ (thread + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let deadline = Instant::now() + CHILD_LIFETIME_MAX;
    let mut index = 0;
    while Instant::now() < deadline {
        let count = match rng.below(10) {
            0..6 => 1 + rng.below(4),
            6..9 => 4 + rng.below(28),
            _ => 32 + rng.below(168),
        };
        let batch: Vec<NewRecord> = (0..count)
            .map(|_| {
                index += 1;
                child_record(&mut rng, seed, thread, index)
            })
            .collect();
        let appended = log.append(&batch).unwrap_or_else(|e| child_fail(&format!("append: {e}")));
        appended.commit.wait().unwrap_or_else(|e| child_fail(&format!("append commit: {e}")));
        let mut lines = String::new();
        for (record, offset) in batch.iter().zip(appended.first_offset..) {
            let key = record.key.as_deref().map_or("-".into(), String::from_utf8_lossy);
            let digest = digest_parts(
                record.timestamp_ms,
                record.attempt,
                record.flags,
                record.key.as_deref(),
                &record.headers,
                &record.payload,
            );
            writeln!(lines, "durable {offset} {digest} {} {key}", record.payload.len()).expect("writing to a String");
        }
        emit(&lines);

        if rng.below(6) == 0 {
            let skip = rng.below(count);
            let first = appended.first_offset + skip;
            let acked = 1 + rng.below(count - skip);
            let kind = if rng.below(4) == 0 { AckKind::DeadLettered } else { AckKind::Acked };
            emit(&format!("acking {first} {acked}\n"));
            let commit = log.ack(first, acked, kind).unwrap_or_else(|e| child_fail(&format!("ack: {e}")));
            commit.wait().unwrap_or_else(|e| child_fail(&format!("ack commit: {e}")));
            emit(&format!("acked {first} {acked}\n"));
        }
        if rng.below(50) == 0 {
            log.sync().unwrap_or_else(|e| child_fail(&format!("sync: {e}")));
        }
    }
}

/// A record with a random shape: mostly small payloads, some spanning a
/// good part of a segment; some with an idempotency key or headers.
fn child_record(rng: &mut Rng, seed: u64, thread: u64, index: u64) -> NewRecord {
    let payload_size = match rng.below(100) {
        0..50 => rng.below(64),
        50..85 => 64 + rng.below(960),
        85..97 => 1024 + rng.below(5000),
        _ => 6000 + rng.below(10_000),
    };
    let mut payload = vec![0u8; payload_size as usize];
    for chunk in payload.chunks_mut(8) {
        let bytes = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let key = (rng.below(8) == 0).then(|| Bytes::from(format!("k-{seed:x}-{thread}-{index}")));
    let headers = if rng.below(8) == 0 {
        (0..1 + rng.below(3)).map(|i| (format!("h{i}"), "v".repeat(rng.below(40) as usize))).collect()
    } else {
        Vec::new()
    };
    NewRecord {
        timestamp_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        attempt: rng.below(4) as u32,
        flags: rng.below(1 << 16) as u16,
        key,
        headers,
        payload: Bytes::from(payload),
    }
}

/// Writes whole lines to stdout and flushes, under the stdout lock so lines
/// of different threads never interleave. A write error means the parent is
/// gone: stop.
fn emit(lines: &str) {
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(lines.as_bytes()).and_then(|()| stdout.flush()).is_err() {
        std::process::exit(4);
    }
}

fn child_fail(message: &str) -> ! {
    eprintln!("crash child: {message}");
    std::process::exit(3);
}

// ---------------------------------------------------------------------------
// Shared

/// CRC32 over every field the caller chose (the offset is checked apart).
fn digest(record: &Record) -> u32 {
    digest_parts(
        record.timestamp_ms,
        record.attempt,
        record.flags,
        record.key.as_deref(),
        &record.headers,
        &record.payload,
    )
}

fn digest_parts(
    timestamp_ms: u64,
    attempt: u32,
    flags: u16,
    key: Option<&[u8]>,
    headers: &[(String, String)],
    payload: &[u8],
) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&timestamp_ms.to_le_bytes());
    hasher.update(&attempt.to_le_bytes());
    hasher.update(&flags.to_le_bytes());
    match key {
        Some(key) => {
            hasher.update(&[1]);
            hasher.update(&(key.len() as u64).to_le_bytes());
            hasher.update(key);
        }
        None => hasher.update(&[0]),
    }
    hasher.update(&(headers.len() as u64).to_le_bytes());
    for (name, value) in headers {
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&(value.len() as u64).to_le_bytes());
        hasher.update(value.as_bytes());
    }
    hasher.update(payload);
    hasher.finalize()
}

/// xorshift64*: small, seedable, good enough for test choices.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so nearby seeds diverge and 0 is fine.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n`; `n` must be positive.
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
