//! The command line: every flag, its default and its help text.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

/// Exit codes, for the `--help` footer; `exit.rs` maps errors to them.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  other error (broker internal error, unsupported command, I/O)
  2  usage error or invalid argument (bad flag, bad queue name, payload too large)
  3  not found (unknown queue)
  4  already exists (queue exists with other settings)
  5  refused (resource exhausted: queue full, disk nearly full; or circuit open)
  6  unavailable (broker unreachable, shutting down, or deadline exceeded)
  7  denied (unauthenticated: missing or unknown token; or permission denied)

Environment:
  BALLAST_ADDR  broker address (overridden by --addr)
  BALLAST_TOKEN bearer token sent to a broker with an auth file (--token-file wins)
  BALLAST_TLS_CA, BALLAST_TLS_CERT, BALLAST_TLS_KEY  as --tls-ca, --tls-cert, --tls-key
  BALLAST_LOG   log filter for diagnostics on stderr (default: warn)";

/// Command-line client of the Ballast message broker.
#[derive(Debug, Parser)]
#[command(name = "ballast", version, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    /// Broker address; a cluster's nodes separated by commas (the client follows the leader).
    #[arg(long, global = true, env = "BALLAST_ADDR", default_value = ballast_client::contract::ADDR_DEFAULT)]
    pub addr: String,

    /// Print JSON (one object per line) instead of human-readable text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Time allowed for each call, retries included, in milliseconds.
    #[arg(long, global = true, value_name = "MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,

    /// File whose first line is the bearer token to send (for a broker
    /// with an auth file); without it, BALLAST_TOKEN is used if set.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// TLS: the CA certificate (PEM) that signed the broker's; turns TLS on
    /// (a bare host:port gets https://).
    #[arg(long, global = true, env = "BALLAST_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,

    /// Mutual TLS: this client's certificate (PEM), for a broker that
    /// requires one; needs --tls-key and --tls-ca.
    #[arg(long, global = true, env = "BALLAST_TLS_CERT", value_name = "PATH", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// Mutual TLS: the client certificate's private key (PEM).
    #[arg(long, global = true, env = "BALLAST_TLS_KEY", value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The broker's address: with TLS, an `http://` one (the default)
    /// becomes `https://`.
    pub fn broker_addr(&self) -> String {
        let one = |addr: &str| match (&self.tls_ca, addr.strip_prefix("http://")) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => addr.to_owned(),
        };
        self.addr.split(',').map(one).collect::<Vec<_>>().join(",")
    }

    /// The client's connection settings, TLS included when asked for.
    pub fn client_config(&self) -> ballast_client::ClientConfig {
        let tls = self.tls_ca.as_ref().map(|ca| {
            let mut tls = ballast_client::TlsConfig::new(ca.clone().into());
            tls.client_cert = self.tls_cert.clone().map(Into::into);
            tls.client_key = self.tls_key.clone().map(Into::into);
            tls
        });
        ballast_client::ClientConfig { tls, ..ballast_client::ClientConfig::default() }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect and remove queues.
    #[command(subcommand)]
    Queue(QueueCommand),

    /// Publish messages: each MESSAGE argument, or else each line of stdin.
    ///
    /// Prints one receipt per message (lane:offset, and "duplicate" when the
    /// idempotency key had been seen). Messages are batched and retried; a
    /// retry never stores a message twice.
    Publish(PublishArgs),

    /// Consume messages: print each delivery and ack it.
    ///
    /// Runs until interrupted (Ctrl-C, which stops gracefully) or, with
    /// --count, until COUNT messages were printed and acked.
    Consume(ConsumeArgs),

    /// Show messages of a queue without taking them (nothing is leased or
    /// redelivered): payload, attempts, dead-letter reason and age.
    ///
    /// Lanes in priority order, oldest first; --count messages (all of them
    /// with --all, a page at a time). For dead letters, peek NAME.dead.
    Peek(PeekArgs),

    /// Move dead letters of NAME.dead back into NAME, each exactly once.
    ///
    /// Each comes back with its application headers and lane, at attempt 1,
    /// through the queue's admission. Safe to repeat after an interruption
    /// (within the queue's dedupe window): what was moved is not moved
    /// again. Prints how many moved.
    Redrive(RedriveArgs),

    /// Extend leases by delivery id so their messages are not redelivered yet.
    ///
    /// For deliveries taken by Pull or by a consumer that cannot extend them
    /// itself: each lease held gets a new deadline LEASE_MS from now. Prints
    /// one line per id: "extended" with the new deadline, "expired" (being
    /// redelivered) or "not leased" (settled, redelivered, or never issued).
    /// Exits 1 unless every lease was extended.
    Extend(ExtendArgs),

    /// Show depth, saturation, rates, oldest age and drain estimate per queue
    /// and lane, once.
    ///
    /// SAT is the fraction of the queue's limits (max messages, max bytes) in
    /// use; a lane's publishes are refused once they would take the queue past
    /// the lane's ADMIT fraction. DRAIN is the backlog over the recent ack
    /// rate: "?" when nothing was acked recently. With --json: one object with
    /// every figure.
    Stats(StatsArgs),

    /// A live view of `stats`, redrawn at every update the broker pushes.
    ///
    /// Runs until interrupted (Ctrl-C), until the broker ends the stream (the
    /// queue was deleted, the broker shut down: exit code as for any error),
    /// or for --iterations updates. The screen is cleared between updates
    /// only when stdout is a terminal; otherwise updates follow each other.
    /// With --json: one object per update, as `stats --json` prints.
    Top(TopArgs),

    /// Bearer tokens for a broker's auth file.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a fresh random token (256 bits, hex) once, and the auth-file
    /// entry with its SHA-256 to paste; the broker never sees the token
    /// itself until a client sends it. Store it where the client reads it
    /// (--token-file, BALLAST_TOKEN).
    New(TokenNewArgs),
}

#[derive(Debug, Args)]
pub struct TokenNewArgs {
    /// The principal's name in the auth file (printable ASCII, no quotes or backslashes).
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Create a queue (and its dead-letter queue NAME.dead). Succeeds if it
    /// exists with the same settings.
    Create(Box<CreateArgs>),
    /// Change settings of a live queue, without a restart; prints the queue.
    ///
    /// Only the flags given change (the defaults shown do not apply). May
    /// change: --max-messages, --max-bytes, --lane-admission,
    /// --max-publish-rate, --max-publish-byte-rate, --lease-timeout-ms,
    /// --max-attempts, --default-lane, --dedupe-window-ms. Lanes, their
    /// order and weights, strict priority, dead letter, message size and
    /// sync policy cannot change on a live queue: the broker refuses the update
    /// (exit 2) naming the setting.
    Update(Box<CreateArgs>),
    /// List every queue with its depth.
    List,
    /// Show one queue's settings and counts.
    Get(NameArg),
    /// Delete a queue and its messages (not its dead-letter queue).
    Delete(NameArg),
    /// Mark every message of a queue done; prints how many.
    Purge(NameArg),
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// Queue name: a-z, 0-9, ".", "_" and "-", starting with a-z or 0-9, at most 128 bytes.
    pub name: String,
}

/// Settings left unset take the broker's defaults.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Queue name: a-z, 0-9, ".", "_" and "-", starting with a-z or 0-9, at most 128 bytes.
    pub name: String,
    /// Lane names, highest priority first [default: high,normal,low].
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub lanes: Vec<String>,
    /// Scheduler weight per lane, same order as --lanes [default: 4,2,1].
    #[arg(long, value_delimiter = ',', value_name = "WEIGHTS")]
    pub lane_weights: Vec<u32>,
    /// Serve lanes in strict priority order instead of by weight.
    #[arg(long)]
    pub strict_priority: bool,
    /// Lane index a publish goes to when it names none [default: the middle lane].
    #[arg(long, value_name = "INDEX")]
    pub default_lane: Option<u32>,
    /// Lease time before an unacked delivery is redelivered [default: 30000].
    #[arg(long, value_name = "MS")]
    pub lease_timeout_ms: Option<u64>,
    /// Deliveries before a message is dead-lettered [default: 5].
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Create no dead-letter queue (messages past max attempts are dropped and counted).
    #[arg(long)]
    pub no_dead_letter: bool,
    /// Window in which a repeated idempotency key is a duplicate [default: 300000].
    #[arg(long, value_name = "MS")]
    pub dedupe_window_ms: Option<u64>,
    /// Largest payload, in bytes [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub message_size_max: Option<u32>,
    /// Durability of publish acknowledgements: fsync, interval or none [default: fsync].
    #[arg(long, value_name = "POLICY")]
    pub sync_policy: Option<ballast_client::SyncPolicy>,
    /// Sync interval for --sync-policy interval [default: 100].
    #[arg(long, value_name = "MS")]
    pub sync_interval_ms: Option<u64>,
    /// Admission limit: messages not yet acked, all lanes together [default: 1000000].
    #[arg(long, value_name = "N")]
    pub max_messages: Option<u64>,
    /// Admission limit: stored bytes of the messages not yet acked, all lanes together (at least 65536)
    /// [default: 1073741824].
    #[arg(long, value_name = "BYTES")]
    pub max_bytes: Option<u64>,
    /// Per lane, same order as --lanes: the fraction of the limits, in (0, 1],
    /// up to which the lane's publishes are admitted [default: 1,0.9,0.7].
    #[arg(long, value_delimiter = ',', value_name = "FRACTIONS")]
    pub lane_admission: Vec<f64>,
    /// Publish quota: messages per second from all producers together, 0 for none; calls over it
    /// wait for their turn or are refused [default: 0].
    #[arg(long, value_name = "N")]
    pub max_publish_rate: Option<u64>,
    /// Publish quota in stored bytes per second, 0 for none [default: 0].
    #[arg(long, value_name = "BYTES")]
    pub max_publish_byte_rate: Option<u64>,
    /// Time to live of every message from its publish, 0 for none; an expired message is never
    /// delivered [default: 0].
    #[arg(long, value_name = "MS")]
    pub message_ttl_ms: Option<u64>,
    /// What becomes of an expired message: dead_letter or drop [default: dead_letter].
    #[arg(long, value_name = "ACTION")]
    pub expired_action: Option<ballast_client::ExpiredAction>,
    /// Delivery pace: deliveries per second to all consumers together, 0 for none [default: 0].
    #[arg(long, value_name = "N")]
    pub max_delivery_rate: Option<u64>,
    /// Copies of the queue: 1, or the cluster's voter count for a queue replicated across the
    /// cluster (docs/replication.md); fixed at creation [default: 1].
    #[arg(long, value_name = "N")]
    pub replicas: Option<u32>,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Queue to publish to.
    pub queue: String,
    /// Message payloads; without any, each line of stdin is one message.
    pub messages: Vec<String>,
    /// Lane, by name (as the queue lists them) or index (0 = highest) [default: the queue's default lane].
    #[arg(long)]
    pub lane: Option<String>,
    /// Header NAME=VALUE; repeat for more.
    #[arg(short = 'H', long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Idempotency key. With several MESSAGE arguments or stdin input,
    /// message N (from 0) gets KEY-N, so publishing the same input again
    /// stores nothing new.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Deliver no earlier than this many milliseconds from now.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub delay_ms: u64,
    /// Expire each message this many milliseconds from now (besides the queue's message_ttl_ms).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub ttl_ms: Option<u64>,
}

#[derive(Debug, Args)]
pub struct PeekArgs {
    /// Queue to read.
    pub queue: String,
    /// Messages to show (1..=1000).
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub count: u32,
    /// Show every message, a page of --count at a time.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// The source queue (its dead letters are in NAME.dead).
    pub name: String,
    /// Move at most N [default: all].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Move only dead letters with exactly this reason.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExtendArgs {
    /// Queue the deliveries came from.
    pub queue: String,
    /// Delivery ids (at most 10000).
    #[arg(required = true, value_name = "DELIVERY_ID")]
    pub delivery_ids: Vec<u64>,
    /// New lease length from now, in milliseconds (10..=43200000); 0 for the queue's lease timeout.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub lease_ms: u64,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Queue to consume from.
    pub queue: String,
    /// Credit window: deliveries the broker may send ahead (1..=10000).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub credit: u32,
    /// Exit after printing and acking N messages.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this queue [default: every queue, dead-letter queues included].
    pub queue: Option<String>,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Only this queue [default: every queue, dead-letter queues included].
    pub queue: Option<String>,
    /// Time between updates, in milliseconds (100..=60000).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
    /// Exit after showing N updates.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "once")]
    pub iterations: Option<u64>,
    /// Show one update and exit (--iterations 1).
    #[arg(long)]
    pub once: bool,
}

impl TopArgs {
    /// Updates to show before exiting; `None` runs until stopped.
    pub fn iterations(&self) -> Option<u64> {
        if self.once { Some(1) } else { self.iterations }
    }
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// The clap definition is consistent (no clashing flags, valid defaults).
    #[test]
    fn definition_is_valid() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ballast").chain(args.iter().copied())).expect("parses")
    }

    /// Global flags work after the subcommand, and the address defaults to
    /// the broker's default.
    #[test]
    fn globals_and_defaults() {
        // The default applies unless the environment running the tests sets
        // BALLAST_ADDR.
        let cli = parse(&["queue", "list", "--json"]);
        assert!(cli.json);
        if std::env::var_os("BALLAST_ADDR").is_none() {
            assert_eq!(cli.addr, "http://127.0.0.1:7400");
        }
        assert!(matches!(cli.command, Command::Queue(QueueCommand::List)));
        assert_eq!(parse(&["--addr", "h:1", "queue", "get", "q"]).addr, "h:1");
    }

    /// --tls-ca turns TLS on (and the address to https://); --tls-cert and
    /// --tls-key come together and need --tls-ca.
    #[test]
    fn tls_flags() {
        let cli = parse(&["queue", "list", "--addr", "http://h:1"]);
        assert!(cli.client_config().tls.is_none());
        assert_eq!(cli.broker_addr(), "http://h:1");
        let cli = parse(&["--tls-ca", "ca.pem", "--addr", "http://h:1", "queue", "list"]);
        assert_eq!(cli.broker_addr(), "https://h:1");
        let tls = cli.client_config().tls.expect("TLS on");
        assert_eq!(tls.ca, ballast_client::Pem::File("ca.pem".into()));
        assert!(tls.client_cert.is_none() && tls.client_key.is_none());
        let cli = parse(&["queue", "list", "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "c.key"]);
        let tls = cli.client_config().tls.expect("TLS on");
        assert_eq!(tls.client_cert, Some(ballast_client::Pem::File("c.pem".into())));
        assert_eq!(tls.client_key, Some(ballast_client::Pem::File("c.key".into())));
        for args in [
            &["queue", "list", "--tls-ca", "ca.pem", "--tls-cert", "c.pem"][..],
            &["queue", "list", "--tls-key", "c.key"],
        ] {
            let parsed = Cli::try_parse_from(std::iter::once("ballast").chain(args.iter().copied()));
            assert!(parsed.is_err(), "{args:?} must be refused");
        }
    }

    /// Publish takes a lane, repeated headers, a key and a delay.
    #[test]
    fn publish_flags() {
        let cli =
            parse(&["publish", "orders", "a", "b", "--lane", "high", "-H", "k=v", "--header", "x=1=2", "--key", "id"]);
        let Command::Publish(args) = cli.command else { panic!("publish") };
        assert_eq!(args.queue, "orders");
        assert_eq!(args.messages, ["a", "b"]);
        assert_eq!(args.lane.as_deref(), Some("high"));
        assert_eq!(args.headers, [("k".to_owned(), "v".to_owned()), ("x".to_owned(), "1=2".to_owned())]);
        assert_eq!(args.key.as_deref(), Some("id"));
        assert!(Cli::try_parse_from(["ballast", "publish", "q", "-H", "novalue"]).is_err());
    }

    /// Consume's credit is bounded by the broker's credit limit.
    #[test]
    fn consume_flags() {
        let Command::Consume(args) = parse(&["consume", "q", "--credit", "10000", "--count", "3"]).command else {
            panic!("consume")
        };
        assert_eq!((args.credit, args.count), (10_000, Some(3)));
        assert!(Cli::try_parse_from(["ballast", "consume", "q", "--credit", "10001"]).is_err());
        assert!(Cli::try_parse_from(["ballast", "consume", "q", "--credit", "0"]).is_err());
        assert!(Cli::try_parse_from(["ballast", "consume", "q", "--count", "0"]).is_err());
    }

    /// Queue creation flags map to settings, lists split on commas.
    #[test]
    fn create_flags() {
        let cli =
            parse(&["queue", "create", "q", "--lanes", "a,b", "--lane-weights", "3,1", "--sync-policy", "interval"]);
        let Command::Queue(QueueCommand::Create(args)) = cli.command else { panic!("create") };
        assert_eq!(args.lanes, ["a", "b"]);
        assert_eq!(args.lane_weights, [3, 1]);
        assert_eq!(args.sync_policy, Some(ballast_client::SyncPolicy::Interval));
        assert!(Cli::try_parse_from(["ballast", "queue", "create", "q", "--sync-policy", "often"]).is_err());

        let cli = parse(&[
            "queue",
            "create",
            "q",
            "--max-messages",
            "50",
            "--lane-admission",
            "1,0.9,0.5",
            "--max-publish-rate",
            "2000",
        ]);
        let Command::Queue(QueueCommand::Create(args)) = cli.command else { panic!("create") };
        assert_eq!(args.max_messages, Some(50));
        assert_eq!(args.lane_admission, [1.0, 0.9, 0.5]);
        assert_eq!((args.max_publish_rate, args.max_publish_byte_rate), (Some(2000), None));
    }

    /// Stats takes an optional queue; top's interval is bounded like the
    /// broker's, and --once means one iteration.
    #[test]
    fn stats_and_top_flags() {
        let Command::Stats(args) = parse(&["stats"]).command else { panic!("stats") };
        assert_eq!(args.queue, None);
        let Command::Top(args) = parse(&["top", "emails", "--interval-ms", "100", "--iterations", "2"]).command else {
            panic!("top")
        };
        assert_eq!((args.queue.as_deref(), args.interval_ms, args.iterations()), (Some("emails"), 100, Some(2)));
        let Command::Top(args) = parse(&["top", "--once"]).command else { panic!("top") };
        assert_eq!((args.interval_ms, args.iterations()), (1000, Some(1)));
        let Command::Top(args) = parse(&["top"]).command else { panic!("top") };
        assert_eq!(args.iterations(), None);
        for bad in
            [&["top", "--interval-ms", "99"][..], &["top", "--interval-ms", "60001"], &["top", "--iterations", "0"]]
        {
            assert!(Cli::try_parse_from(std::iter::once("ballast").chain(bad.iter().copied())).is_err(), "{bad:?}");
        }
        assert!(Cli::try_parse_from(["ballast", "top", "--once", "--iterations", "3"]).is_err());
    }
}
