//! Who may do what: the principals of the auth file (`--auth-file`,
//! `[auth] file`), how a request's credentials name one of them, what each
//! may do to which queues, and the table that slows down peers that keep
//! failing to authenticate.
//!
//! The file's shape (see `docs/security.md`):
//!
//! ```toml
//! [[principals]]
//! name = "orders-service"
//! token_sha256 = "<64 hex digits>"
//! allow = [ { queues = "orders*", actions = ["publish", "consume"] } ]
//!
//! [[principals]]
//! name = "ops"
//! cert_identity = "ops.example.internal"
//! allow = [ { queues = "*", actions = ["publish", "consume", "admin", "stats"] } ]
//! ```
//!
//! Tokens are never stored: the file holds their SHA-256, and a request's
//! token is hashed and its digest compared with every stored one in
//! constant time. The file is read again on
//! SIGHUP and when its modification time or size changes
//! ([`AUTH_RELOAD_POLL_MS`]); a new file that does not load is logged and the
//! old principals stay.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::limits::{
    AUTH_FAILURE_PEERS_MAX, AUTH_FAILURE_WINDOW_MS, AUTH_FAILURES_MAX, AUTH_RELOAD_POLL_MS, DEAD_LETTER_SUFFIX,
};

/// The tracing target of the audit lines: one per admin action and per
/// authentication failure (and per refused permission).
pub const AUDIT_TARGET: &str = "ballast::audit";

/// What a rule may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publish and PublishBatch.
    Publish,
    /// Consume (stream), Pull, Ack and Nack.
    Consume,
    /// CreateQueue, GetQueue, ListQueues, PurgeQueue, DeleteQueue.
    Admin,
    /// GetStats and Watch.
    Stats,
    /// The cluster's internal Raft service (node to node); granted by a
    /// rule on every queue (`queues = "*"`).
    Cluster,
}

impl Action {
    const ALL: [Action; 5] = [Action::Publish, Action::Consume, Action::Admin, Action::Stats, Action::Cluster];

    /// The name the auth file and the messages use.
    pub fn name(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Consume => "consume",
            Action::Admin => "admin",
            Action::Stats => "stats",
            Action::Cluster => "cluster",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One `allow` entry: a queue glob and the actions it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    queues: String,
    actions: u8,
}

/// A named identity of the auth file and what it may do.
#[derive(Debug)]
pub struct Principal {
    pub name: String,
    rules: Vec<Rule>,
    /// Set when a reload removed or changed this principal: the streams it
    /// opened end (see [`Principal::revoked`]).
    revoked: tokio::sync::watch::Sender<Option<Revocation>>,
}

/// Why a principal's open streams end after a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Its token or certificate identity is no longer in the file.
    Removed,
    /// It is still there, with other rules (or another name).
    Changed,
}

impl Principal {
    fn new(name: String, rules: Vec<Rule>) -> Principal {
        Principal { name, rules, revoked: tokio::sync::watch::Sender::new(None) }
    }

    /// Resolves once a reload revoked this principal, with why. Streams
    /// (Consume, Watch) await it so that a removed token or a narrowed
    /// rule takes effect on them too, not only on new calls.
    pub async fn revoked(&self) -> Revocation {
        let mut revoked = self.revoked.subscribe();
        loop {
            if let Some(why) = *revoked.borrow_and_update() {
                return why;
            }
            if revoked.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    fn revoke(&self, why: Revocation) {
        self.revoked.send_replace(Some(why));
    }

    /// Whether this principal may do `action` on `queue`: a rule's glob
    /// matches the queue and names the action; a dead-letter queue
    /// (`<q>.dead`) also follows its source queue `<q>`.
    pub fn allows(&self, action: Action, queue: &str) -> bool {
        let by_rule =
            |name: &str| self.rules.iter().any(|r| r.actions & action.bit() != 0 && glob_match(&r.queues, name));
        by_rule(queue) || queue.strip_suffix(DEAD_LETTER_SUFFIX).is_some_and(by_rule)
    }
}

/// `*` matches any run of characters (none included), `?` exactly one;
/// everything else matches itself. Matched byte by byte, without
/// allocating (it runs for every queue of a ListQueues): queue names are
/// ASCII, so a byte is a character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    // Iterative matching with one backtrack point (the last `*`): linear
    // in practice, never exponential.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The hex SHA-256 of a token, as `token_sha256` holds it.
pub fn token_sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The principals of one version of the auth file.
#[derive(Debug, Default)]
pub struct Principals {
    /// Keyed by the SHA-256 of the token (the map finds duplicates when the
    /// file loads). A lookup hashes the caller's token and compares its
    /// digest with every stored one in full, in constant time
    /// ([`digests_equal`]), so the time a call takes says nothing about
    /// any stored digest; tokens themselves are never compared.
    by_token: HashMap<[u8; 32], Arc<Principal>>,
    by_cert: HashMap<String, Arc<Principal>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    principals: Vec<toml::Spanned<RawPrincipal>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    name: String,
    token_sha256: Option<String>,
    cert_identity: Option<String>,
    #[serde(default)]
    allow: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    queues: String,
    actions: Vec<String>,
}

/// Whether two digests are equal, looking at every byte whatever differs
/// (no early exit), so the comparison takes the same time for any input.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        digest[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(digest)
}

impl Principals {
    /// Parses and checks an auth file's text. The message names the line
    /// and the principal of the first problem.
    pub fn from_toml(text: &str) -> Result<Principals, String> {
        let file: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut principals = Principals::default();
        let mut names = std::collections::HashSet::new();
        for spanned in file.principals {
            let line = 1 + text[..spanned.span().start.min(text.len())].matches('\n').count();
            let raw = spanned.into_inner();
            let at = |problem: String| format!("line {line}: principal {:?}: {problem}", raw.name);
            if raw.name.is_empty() {
                return Err(format!("line {line}: a principal needs a non-empty name"));
            }
            if !names.insert(raw.name.clone()) {
                return Err(at("the name is used by another principal".into()));
            }
            let mut rules = Vec::with_capacity(raw.allow.len());
            for rule in &raw.allow {
                if rule.queues.is_empty() {
                    return Err(at("an allow rule has an empty queues glob".into()));
                }
                let mut actions = 0;
                for action in &rule.actions {
                    let Some(known) = Action::ALL.iter().find(|a| a.name() == action) else {
                        return Err(at(format!(
                            "unknown action {action:?} (the actions are publish, consume, admin, stats, cluster)"
                        )));
                    };
                    actions |= known.bit();
                }
                rules.push(Rule { queues: rule.queues.clone(), actions });
            }
            let principal = Arc::new(Principal::new(raw.name.clone(), rules));
            match (&raw.token_sha256, &raw.cert_identity) {
                (Some(hex), None) => {
                    let digest = parse_digest(&hex.to_ascii_lowercase())
                        .ok_or_else(|| at("token_sha256 must be 64 hex digits (the SHA-256 of the token)".into()))?;
                    if principals.by_token.insert(digest, principal).is_some() {
                        return Err(at("its token_sha256 is another principal's".into()));
                    }
                }
                (None, Some(identity)) => {
                    if identity.is_empty() {
                        return Err(at("cert_identity is empty".into()));
                    }
                    if principals.by_cert.insert(identity.clone(), principal).is_some() {
                        return Err(at("its cert_identity is another principal's".into()));
                    }
                }
                (Some(_), Some(_)) => return Err(at("give token_sha256 or cert_identity, not both".into())),
                (None, None) => return Err(at("give token_sha256 or cert_identity".into())),
            }
        }
        Ok(principals)
    }

    /// The principal whose token this is.
    pub fn by_token(&self, token: &str) -> Option<Arc<Principal>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every entry is compared, whatever matched before: the work is the
        // same for every token, valid or not.
        let mut found = None;
        for (stored, principal) in &self.by_token {
            if digests_equal(stored, &digest) {
                found = Some(principal);
            }
        }
        found.cloned()
    }

    /// The principal mapped to one of a certificate's identities.
    pub fn by_cert(&self, identities: &[String]) -> Option<Arc<Principal>> {
        identities.iter().find_map(|id| self.by_cert.get(id).cloned())
    }

    /// Takes over what `old` already had: a principal with the same
    /// credential, name and rules stays the same principal (its open
    /// streams go on); every other principal of `old` is revoked.
    fn carry_over(&mut self, old: &Principals) {
        fn merge<K: std::hash::Hash + Eq>(new: &mut HashMap<K, Arc<Principal>>, old: &HashMap<K, Arc<Principal>>) {
            for (key, before) in old {
                match new.get_mut(key) {
                    Some(now) if now.name == before.name && now.rules == before.rules => *now = Arc::clone(before),
                    Some(_) => before.revoke(Revocation::Changed),
                    None => before.revoke(Revocation::Removed),
                }
            }
        }
        merge(&mut self.by_token, &old.by_token);
        merge(&mut self.by_cert, &old.by_cert);
    }

    /// How many principals the file names.
    pub fn len(&self) -> usize {
        self.by_token.len() + self.by_cert.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What identifies an auth file's version on disk.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reads and checks the auth file at `path`.
pub fn load_file(path: &Path) -> Result<Principals, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("auth file {}: {e}", path.display()))?;
    Principals::from_toml(&text).map_err(|e| format!("auth file {}: {e}", path.display()))
}

/// The broker's authentication state: the current principals, where they
/// come from, and the failed-authentication table.
#[derive(Debug)]
pub struct Auth {
    path: PathBuf,
    current: RwLock<Arc<Principals>>,
    stamp: Mutex<Stamp>,
    pub failures: Failures,
}

impl Auth {
    /// Loads the auth file; fails with a message naming the file, the line
    /// and the principal.
    pub fn load(path: &Path) -> Result<Arc<Auth>, String> {
        let before = stamp(path);
        let principals = load_file(path)?;
        Ok(Arc::new(Auth {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(principals)),
            stamp: Mutex::new(before),
            failures: Failures::default(),
        }))
    }

    /// The principals in force.
    pub fn principals(&self) -> Arc<Principals> {
        Arc::clone(&self.current.read())
    }

    /// Reads the file again; on failure logs why and keeps the principals
    /// in force. Returns whether the new file was taken.
    pub fn reload(&self, why: &str) -> bool {
        *self.stamp.lock() = stamp(&self.path);
        match load_file(&self.path) {
            Ok(mut principals) => {
                tracing::info!(target: AUDIT_TARGET, why, principals = principals.len(), action = "reload_auth",
                    outcome = "ok", "auth file reloaded");
                let mut current = self.current.write();
                principals.carry_over(&current);
                *current = Arc::new(principals);
                true
            }
            Err(error) => {
                tracing::error!(target: AUDIT_TARGET, why, %error, action = "reload_auth", outcome = "failed",
                    "the new auth file does not load; the previous principals stay in force");
                false
            }
        }
    }

    /// Reloads when the file's modification time or size changed.
    fn reload_if_changed(&self) {
        let now = stamp(&self.path);
        if now.is_some() && now != *self.stamp.lock() {
            self.reload("file changed");
        }
    }

    /// Starts reloading on SIGHUP and on a change of the file (polled every
    /// [`AUTH_RELOAD_POLL_MS`]); the handler is installed before this
    /// returns, so a SIGHUP sent afterwards never kills the process. The
    /// task ends when the last other handle on `self` is dropped.
    pub fn watch(self: &Arc<Self>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup())?;
        let auth = Arc::downgrade(self);
        Ok(tokio::spawn(async move {
            let mut poll = tokio::time::interval(Duration::from_millis(AUTH_RELOAD_POLL_MS));
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let hup = tokio::select! {
                    _ = hangup.recv() => true,
                    _ = poll.tick() => false,
                };
                let Some(auth) = auth.upgrade() else { return };
                // File I/O, off the runtime's workers.
                let checked = tokio::task::spawn_blocking(move || {
                    if hup {
                        auth.reload("SIGHUP");
                    } else {
                        auth.reload_if_changed();
                    }
                });
                if let Err(error) = checked.await {
                    tracing::error!(%error, "checking the auth file failed");
                }
            }
        }))
    }
}

/// The key a peer's failures count under: its IPv4 address, or its IPv6
/// /64 (one host usually holds a whole /64, so counting single IPv6
/// addresses would let it guess without limit).
fn peer_key(peer: Option<IpAddr>) -> Option<IpAddr> {
    peer.map(|ip| match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
        v4 => v4,
    })
}

/// Failed authentications per peer address (IPv6: per /64), in windows of
/// [`AUTH_FAILURE_WINDOW_MS`]: past [`AUTH_FAILURES_MAX`] in one window the
/// peer's calls are refused before their credentials are checked, until the
/// window ends. At most [`AUTH_FAILURE_PEERS_MAX`] addresses are tracked;
/// a new one past it replaces the one whose window started first.
#[derive(Debug, Default)]
pub struct Failures {
    table: Mutex<HashMap<Option<IpAddr>, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

impl Failures {
    const WINDOW: Duration = Duration::from_millis(AUTH_FAILURE_WINDOW_MS);

    /// `Err(retry_after_ms)` while `peer` is held off.
    pub fn check(&self, peer: Option<IpAddr>, now: Instant) -> Result<(), u64> {
        let table = self.table.lock();
        match table.get(&peer_key(peer)) {
            Some(w) if w.failures >= AUTH_FAILURES_MAX && now.duration_since(w.start) < Self::WINDOW => {
                let left = Self::WINDOW - now.duration_since(w.start);
                Err(u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1))
            }
            _ => Ok(()),
        }
    }

    /// Counts one failed authentication of `peer`.
    pub fn record(&self, peer: Option<IpAddr>, now: Instant) {
        let peer = peer_key(peer);
        let mut table = self.table.lock();
        if !table.contains_key(&peer) && table.len() >= AUTH_FAILURE_PEERS_MAX {
            let oldest = table.iter().min_by_key(|(_, w)| w.start).map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                table.remove(&oldest);
            }
        }
        let window = table.entry(peer).or_insert(Window { start: now, failures: 0 });
        if now.duration_since(window.start) >= Self::WINDOW {
            *window = Window { start: now, failures: 0 };
        }
        window.failures = window.failures.saturating_add(1);
    }

    /// Addresses tracked.
    pub fn len(&self) -> usize {
        self.table.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Digests are equal only when every byte is; a difference in the first
    /// or the last byte alone is found.
    #[test]
    fn digests_are_compared_whole() {
        let a = [7u8; 32];
        assert!(digests_equal(&a, &a));
        for at in [0, 31] {
            let mut b = a;
            b[at] ^= 1;
            assert!(!digests_equal(&a, &b), "byte {at} differs");
        }
    }

    const TOKEN: &str = "s3cret-token";

    fn file(extra: &str) -> String {
        format!(
            "[[principals]]\nname = \"orders\"\ntoken_sha256 = \"{}\"\n\
             allow = [ {{ queues = \"orders*\", actions = [\"publish\", \"consume\"] }} ]\n\n\
             [[principals]]\nname = \"ops\"\ncert_identity = \"ops.example.internal\"\n\
             allow = [ {{ queues = \"*\", actions = [\"publish\", \"consume\", \"admin\", \"stats\"] }} ]\n{extra}",
            token_sha256_hex(TOKEN)
        )
    }

    /// `*` matches any run (empty included), `?` one character, the rest
    /// itself; a pattern must cover the whole name.
    #[test]
    fn glob_matches_stars_and_question_marks() {
        for (pattern, text, expected) in [
            ("*", "", true),
            ("*", "anything", true),
            ("orders*", "orders", true),
            ("orders*", "orders.dead", true),
            ("orders*", "order", false),
            ("orders", "orders2", false),
            ("o?ders", "orders", true),
            ("o?ders", "oders", false),
            ("*.dead", "x.dead", true),
            ("*.dead", "x.deadx", false),
            ("a*b*c", "a-b-b-c", true),
            ("a*b*c", "a-b-b-", false),
            ("", "", true),
            ("", "a", false),
            ("é?", "éx", true),
            ("a?c", "a.c", true),
        ] {
            assert_eq!(glob_match(pattern, text), expected, "{pattern:?} against {text:?}");
        }
        // Many stars against a long non-match ends quickly (no blow-up).
        let long = "a".repeat(5000);
        assert!(!glob_match("*a*a*a*a*a*a*a*b", &long));
    }

    /// The issue's example loads; tokens are found by their hash, certs by
    /// any identity; permissions follow the globs and actions, and a
    /// dead-letter queue follows its source unless a rule names it.
    #[test]
    fn the_example_file_loads_and_grants_what_it_says() {
        let principals = Principals::from_toml(&file("")).unwrap();
        assert_eq!(principals.len(), 2);
        let orders = principals.by_token(TOKEN).expect("the token's principal");
        assert_eq!(orders.name, "orders");
        assert!(principals.by_token("s3cret-tokeN").is_none());
        let ops = principals.by_cert(&["nope".into(), "ops.example.internal".into()]).expect("mapped");
        assert_eq!(ops.name, "ops");
        assert!(principals.by_cert(&["other".into()]).is_none());
        assert!(orders.allows(Action::Publish, "orders"));
        assert!(orders.allows(Action::Consume, "orders-eu"));
        assert!(!orders.allows(Action::Admin, "orders"));
        assert!(!orders.allows(Action::Stats, "orders"));
        assert!(!orders.allows(Action::Publish, "billing"));
        assert!(orders.allows(Action::Consume, "orders.dead"));
        assert!(ops.allows(Action::Admin, "anything"));
        let dlq = format!(
            "[[principals]]\nname = \"src\"\ntoken_sha256 = \"{}\"\nallow = [ {{ queues = \"jobs\", actions = [\"consume\"] }} ]\n\
             [[principals]]\nname = \"dlq-reader\"\ntoken_sha256 = \"{}\"\nallow = [ {{ queues = \"jobs.dead\", actions = [\"consume\"] }} ]\n",
            token_sha256_hex("a"),
            token_sha256_hex("b")
        );
        let principals = Principals::from_toml(&dlq).unwrap();
        let src = principals.by_token("a").unwrap();
        let reader = principals.by_token("b").unwrap();
        assert!(src.allows(Action::Consume, "jobs.dead"), "follows its source");
        assert!(!src.allows(Action::Consume, "other.dead"));
        assert!(reader.allows(Action::Consume, "jobs.dead"), "a rule names it");
        assert!(!reader.allows(Action::Consume, "jobs"), "the dead-letter rule does not grant the source");
    }

    /// Every problem is refused with the line and the principal named.
    #[test]
    fn bad_files_are_refused_naming_line_and_principal() {
        let hash = token_sha256_hex("x");
        for (extra, needle) in [
            ("[[principals]]\nname = \"bad\"\ntoken_sha256 = \"zz\"\n", "64 hex digits"),
            (&*format!("[[principals]]\nname = \"bad\"\ntoken_sha256 = \"{}\"\n", &hash[..63]), "64 hex digits"),
            (
                &*format!("[[principals]]\nname = \"bad\"\ntoken_sha256 = \"{hash}\"\ncert_identity = \"c\"\n"),
                "not both",
            ),
            ("[[principals]]\nname = \"bad\"\nallow = []\n", "give token_sha256 or cert_identity"),
            (
                &*format!(
                    "[[principals]]\nname = \"bad\"\ntoken_sha256 = \"{hash}\"\nallow = [ {{ queues = \"*\", actions = [\"write\"] }} ]\n"
                ),
                "unknown action \"write\"",
            ),
            (&*format!("[[principals]]\nname = \"ops\"\ntoken_sha256 = \"{hash}\"\n"), "used by another principal"),
            (
                &*format!("[[principals]]\nname = \"bad\"\ntoken_sha256 = \"{}\"\n", token_sha256_hex(TOKEN)),
                "another principal's",
            ),
            ("[[principals]]\nname = \"bad\"\ncert_identity = \"ops.example.internal\"\n", "another principal's"),
        ] {
            let error = Principals::from_toml(&file(extra)).unwrap_err();
            assert!(error.contains(needle), "{extra}: {error}");
            assert!(error.contains("line 10"), "the third principal starts on line 10: {error}");
            assert!(error.contains("\"bad\"") || error.contains("\"ops\""), "{error}");
        }
        assert!(Principals::from_toml("[[principals]]\nnam = \"x\"\n").unwrap_err().contains("nam"));
        // Upper-case hex is the same digest.
        let upper = format!("[[principals]]\nname = \"u\"\ntoken_sha256 = \"{}\"\n", hash.to_uppercase());
        assert!(Principals::from_toml(&upper).unwrap().by_token("x").is_some());
    }

    /// A reload keeps an unchanged principal (the same one: its streams go
    /// on) and revokes a changed or removed one, saying which.
    #[tokio::test]
    async fn a_reload_revokes_changed_and_removed_principals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        let entry = |name: &str, token: &str, glob: &str| {
            format!(
                "[[principals]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n\
                 allow = [ {{ queues = \"{glob}\", actions = [\"consume\"] }} ]\n",
                token_sha256_hex(token)
            )
        };
        std::fs::write(&path, entry("same", "a", "*") + &entry("narrowed", "b", "*") + &entry("gone", "c", "*"))
            .unwrap();
        let auth = Auth::load(&path).unwrap();
        let before = auth.principals();
        let (same, narrowed, gone) =
            (before.by_token("a").unwrap(), before.by_token("b").unwrap(), before.by_token("c").unwrap());
        std::fs::write(&path, entry("same", "a", "*") + &entry("narrowed", "b", "jobs")).unwrap();
        assert!(auth.reload("test"));
        let after = auth.principals();
        assert!(Arc::ptr_eq(&after.by_token("a").unwrap(), &same), "unchanged: the same principal");
        assert!(!Arc::ptr_eq(&after.by_token("b").unwrap(), &narrowed));
        assert!(after.by_token("c").is_none());
        let now = |p: &Arc<Principal>| *p.revoked.borrow();
        assert_eq!(
            (now(&same), now(&narrowed), now(&gone)),
            (None, Some(Revocation::Changed), Some(Revocation::Removed))
        );
        assert_eq!(gone.revoked().await, Revocation::Removed);
        let waiting = tokio::time::timeout(Duration::from_millis(50), same.revoked()).await;
        assert!(waiting.is_err(), "an unchanged principal is not revoked");
    }

    /// A peer is held off once it reaches `AUTH_FAILURES_MAX` failures in a
    /// window (not one failure before), other peers are not, and the hold
    /// ends with the window.
    #[test]
    fn failures_hold_a_peer_off_at_the_limit() {
        let failures = Failures::default();
        let peer = Some(IpAddr::from([10, 0, 0, 1]));
        let other = Some(IpAddr::from([10, 0, 0, 2]));
        let start = Instant::now();
        for _ in 0..AUTH_FAILURES_MAX - 1 {
            failures.record(peer, start);
        }
        assert_eq!(failures.check(peer, start), Ok(()), "one under the limit");
        failures.record(peer, start);
        let retry = failures.check(peer, start).unwrap_err();
        assert_eq!(retry, AUTH_FAILURE_WINDOW_MS);
        assert_eq!(failures.check(other, start), Ok(()));
        let later = start + Duration::from_millis(AUTH_FAILURE_WINDOW_MS);
        assert_eq!(failures.check(peer, later), Ok(()), "the window ended");
        failures.record(peer, later);
        assert_eq!(failures.check(peer, later), Ok(()), "a new window counts from one");
    }

    /// IPv6 peers of one /64 share a window; IPv4-mapped addresses count
    /// as their IPv4 address.
    #[test]
    fn ipv6_peers_count_per_64() {
        let failures = Failures::default();
        let now = Instant::now();
        for i in 0..AUTH_FAILURES_MAX {
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            failures.record(Some(ip), now);
        }
        let same_64: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(failures.check(Some(same_64), now).is_err());
        assert_eq!(failures.check(Some(other_64), now), Ok(()));
        assert_eq!(peer_key("::ffff:10.0.0.1".parse().ok()), "10.0.0.1".parse().ok());
    }

    /// The table holds at most `AUTH_FAILURE_PEERS_MAX` addresses: at the
    /// limit all stay; one more replaces the oldest.
    #[test]
    fn the_failure_table_is_bounded() {
        let failures = Failures::default();
        let start = Instant::now();
        let ip = |i: usize| Some(IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]));
        for i in 0..AUTH_FAILURE_PEERS_MAX {
            failures.record(ip(i), start + Duration::from_nanos(i as u64));
        }
        assert_eq!(failures.len(), AUTH_FAILURE_PEERS_MAX);
        failures.record(ip(AUTH_FAILURE_PEERS_MAX), start + Duration::from_secs(1));
        assert_eq!(failures.len(), AUTH_FAILURE_PEERS_MAX);
        assert!(!failures.table.lock().contains_key(&ip(0)), "the oldest went");
    }
}
