//! One function per command, on top of `ballast-client`.

use std::{collections::VecDeque, io::IsTerminal, time::Duration};

use ballast_client::{
    Admin, AdminConfig, Client, ClientConfig, ConsumerConfig, Delivery, Error, LeaseExtension, Message, PendingReceipt,
    Producer, ProducerConfig, QueueSettings,
};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{
    args::{
        Cli, Command, ConsumeArgs, CreateArgs, ExtendArgs, PeekArgs, PublishArgs, QueueCommand, StatsArgs,
        TokenCommand, TopArgs,
    },
    exit::CliError,
    output::{Output, Screen},
};

/// Receipts awaited at once while reading stdin: enough to fill batches,
/// few enough that memory stays small for any input size.
const PUBLISH_WINDOW: usize = 1024;

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let output = Output { json: cli.json };
    if let Command::Token(TokenCommand::New(args)) = &cli.command {
        return token_new(output, &args.name);
    }
    let config = cli.client_config();
    let config = match (&cli.token_file, std::env::var("BALLAST_TOKEN")) {
        (Some(path), _) => config.token_file(path)?,
        (None, Ok(token)) if !token.is_empty() => ClientConfig { token: Some(token), ..config },
        _ => config,
    };
    let client = Client::with_config(&cli.broker_addr(), config)?;
    let timeout = cli.timeout();
    match cli.command {
        Command::Queue(command) => queue(&client, timeout, output, command).await,
        Command::Publish(args) => publish(&client, timeout, output, args).await,
        Command::Consume(args) => consume(&client, timeout, output, args).await,
        Command::Extend(args) => extend(&client, timeout, output, args).await,
        Command::Peek(args) => peek(&client, timeout, output, args).await,
        Command::Redrive(args) => {
            let done = admin(&client, timeout).redrive(&args.name, args.count, args.reason.as_deref()).await?;
            Ok(output.redriven(&args.name, &done)?)
        }
        Command::Stats(args) => stats(&client, timeout, output, args).await,
        Command::Top(args) => top(&client, timeout, output, args).await,
        Command::Token(_) => Ok(()),
    }
}

/// `ballast token new NAME`: a fresh token of 256 random bits, printed
/// once with the auth-file entry that holds its SHA-256.
fn token_new(output: Output, name: &str) -> Result<(), CliError> {
    use sha2::Digest;
    let printable = |c: char| c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ';
    if name.is_empty() || !name.chars().all(printable) {
        return Err(CliError::Usage(format!(
            "the principal name {name:?} must be non-empty printable ASCII without quotes or backslashes"
        )));
    }
    let mut bits = [0u8; 32];
    getrandom::fill(&mut bits).map_err(|e| CliError::Io(std::io::Error::other(e.to_string())))?;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let token = hex(&bits);
    let digest = hex(&sha2::Sha256::digest(token.as_bytes()));
    Ok(output.token(name, &token, &digest)?)
}

/// `ballast peek QUEUE`: one page, or every page with --all (each call
/// within the timeout).
async fn peek(client: &Client, timeout: Duration, output: Output, args: PeekArgs) -> Result<(), CliError> {
    let mut start = None;
    loop {
        let page = tokio::time::timeout(timeout, client.peek(&args.queue, start, args.count))
            .await
            .map_err(|_| Error::DeadlineExceeded { timeout: Some(timeout), last_error: None })??;
        for message in &page.messages {
            output.peeked(message)?;
        }
        match page.next {
            Some(next) if args.all => start = Some(next),
            _ => return Ok(()),
        }
    }
}

/// `ballast extend QUEUE ID...`: one Extend call; every outcome printed,
/// and a failure exit unless each lease was extended.
async fn extend(client: &Client, timeout: Duration, output: Output, args: ExtendArgs) -> Result<(), CliError> {
    let lease = Duration::from_millis(args.lease_ms);
    let extend = client.extend_leases(&args.queue, &args.delivery_ids, lease);
    let results = tokio::time::timeout(timeout, extend)
        .await
        .map_err(|_| Error::DeadlineExceeded { timeout: Some(timeout), last_error: None })??;
    for (delivery_id, extension) in &results {
        output.extension(*delivery_id, extension)?;
    }
    let refused = results.iter().filter(|(_, e)| !matches!(e, LeaseExtension::Extended { .. })).count();
    if refused > 0 {
        return Err(CliError::Client(Error::FailedPrecondition {
            message: format!("{refused} of {} leases were not extended", results.len()),
        }));
    }
    Ok(())
}

/// An admin handle whose calls (retries included) end within `timeout`.
fn admin(client: &Client, timeout: Duration) -> Admin {
    client.admin_with_config(AdminConfig {
        deadline: timeout,
        attempt_timeout: timeout.min(AdminConfig::default().attempt_timeout),
        ..AdminConfig::default()
    })
}

async fn queue(client: &Client, timeout: Duration, output: Output, command: QueueCommand) -> Result<(), CliError> {
    let admin = admin(client, timeout);
    match command {
        QueueCommand::Create(args) => {
            let name = args.name.clone();
            output.queue(&admin.create_queue(&name, settings(*args)).await?)?;
        }
        QueueCommand::Update(args) => {
            let name = args.name.clone();
            output.queue(&admin.update_queue(&name, settings(*args)).await?)?;
        }
        QueueCommand::List => output.queues(&admin.list_queues().await?)?,
        QueueCommand::Get(args) => output.queue(&admin.get_queue(&args.name).await?)?,
        QueueCommand::Delete(args) => {
            admin.delete_queue(&args.name).await?;
            output.deleted(&args.name)?;
        }
        QueueCommand::Purge(args) => {
            let purged = admin.purge_queue(&args.name).await?;
            output.purged(&args.name, purged)?;
        }
    }
    Ok(())
}

fn settings(args: CreateArgs) -> QueueSettings {
    let mut settings = QueueSettings::default();
    settings.lanes = args.lanes;
    settings.lane_weights = args.lane_weights;
    settings.strict_priority = args.strict_priority.then_some(true);
    settings.default_lane = args.default_lane;
    settings.lease_timeout = args.lease_timeout_ms.map(Duration::from_millis);
    settings.max_attempts = args.max_attempts;
    settings.dead_letter = args.no_dead_letter.then_some(false);
    settings.dedupe_window = args.dedupe_window_ms.map(Duration::from_millis);
    settings.message_size_max = args.message_size_max;
    settings.sync_policy = args.sync_policy;
    settings.sync_interval = args.sync_interval_ms.map(Duration::from_millis);
    settings.max_messages = args.max_messages;
    settings.max_bytes = args.max_bytes;
    settings.lane_admission = args.lane_admission;
    settings.max_publish_rate = args.max_publish_rate;
    settings.max_publish_byte_rate = args.max_publish_byte_rate;
    settings.message_ttl = args.message_ttl_ms.map(Duration::from_millis);
    settings.expired_action = args.expired_action;
    settings.max_delivery_rate = args.max_delivery_rate;
    settings.replicas = args.replicas;
    settings
}

async fn publish(client: &Client, timeout: Duration, output: Output, args: PublishArgs) -> Result<(), CliError> {
    let lane = match &args.lane {
        None => None,
        Some(lane) => Some(resolve_lane(client, timeout, &args.queue, lane).await?),
    };
    // One batch in flight keeps the input order on the broker (see
    // Producer::submit); batches of up to 100 keep it fast.
    let producer =
        client.producer(ProducerConfig { deadline: timeout, in_flight_batches_max: 1, ..ProducerConfig::default() })?;
    let template = Template {
        lane,
        headers: args.headers,
        key: args.key,
        delay: Duration::from_millis(args.delay_ms),
        ttl: args.ttl_ms.map(Duration::from_millis),
    };
    let mut publisher = Publisher {
        producer,
        queue: args.queue,
        output,
        window: VecDeque::new(),
        failure: None,
        last_error: None,
        repeats: 0,
    };
    if args.messages.is_empty() {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let mut index = 0;
        while let Some(line) = lines.next_line().await? {
            publisher.send(template.message(line, index, true)).await?;
            index += 1;
        }
    } else {
        let several = args.messages.len() > 1;
        for (index, payload) in args.messages.into_iter().enumerate() {
            publisher.send(template.message(payload, index, several)).await?;
        }
    }
    match publisher.finish().await? {
        Some(error) => Err(CliError::Reported(error)),
        None => Ok(()),
    }
}

/// Maps `--lane` to an index: a number is one; a name is looked up in the
/// queue's lanes.
async fn resolve_lane(client: &Client, timeout: Duration, queue: &str, lane: &str) -> Result<u32, CliError> {
    if let Ok(index) = lane.parse::<u32>() {
        return Ok(index);
    }
    let admin = client.admin_with_config(AdminConfig { deadline: timeout, ..AdminConfig::default() });
    let info = admin.get_queue(queue).await?;
    info.settings.lane_index(lane).ok_or_else(|| {
        CliError::Usage(format!("queue {queue} has no lane {lane:?}; its lanes are {}", info.settings.lanes.join(", ")))
    })
}

/// What every published message shares.
struct Template {
    lane: Option<u32>,
    headers: Vec<(String, String)>,
    key: Option<String>,
    delay: Duration,
    ttl: Option<Duration>,
}

impl Template {
    fn message(&self, payload: String, index: usize, several: bool) -> Message {
        let mut message = Message::new(payload).with_delay(self.delay);
        if let Some(ttl) = self.ttl {
            message = message.with_ttl(ttl);
        }
        if let Some(lane) = self.lane {
            message = message.with_lane(lane);
        }
        for (name, value) in &self.headers {
            message = message.with_header(name.clone(), value.clone());
        }
        if let Some(key) = &self.key {
            message = message.with_idempotency_key(if several { format!("{key}-{index}") } else { key.clone() });
        }
        message
    }
}

/// Submits messages in input order (so they share batches and keep their
/// order) and prints receipts in the same order, with a bounded number
/// waiting.
struct Publisher {
    producer: Producer,
    queue: String,
    output: Output,
    window: VecDeque<PendingReceipt>,
    /// The first failure, which decides the exit code.
    failure: Option<Error>,
    /// The last error printed, and how many later messages failed with the
    /// same one (a refused batch fails each of its messages alike: one
    /// line says so, not one line per message).
    last_error: Option<String>,
    repeats: usize,
}

impl Publisher {
    async fn send(&mut self, message: Message) -> Result<(), CliError> {
        match self.producer.submit(&self.queue, message).await {
            Ok(pending) => self.window.push_back(pending),
            Err(error) => self.failed(error),
        }
        if self.window.len() >= PUBLISH_WINDOW {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<(), CliError> {
        let Some(pending) = self.window.pop_front() else { return Ok(()) };
        match pending.wait().await {
            Ok(receipt) => self.output.receipt(&receipt)?,
            Err(error) => self.failed(error),
        }
        Ok(())
    }

    fn failed(&mut self, error: Error) {
        let text = error.to_string();
        if self.last_error.as_deref() == Some(text.as_str()) {
            self.repeats += 1;
        } else {
            self.report_repeats();
            eprintln!("error: {}", crate::output::printable(&text));
            self.last_error = Some(text);
        }
        self.failure.get_or_insert(error);
    }

    fn report_repeats(&mut self) {
        if self.repeats > 0 {
            let s = if self.repeats == 1 { "" } else { "s" };
            eprintln!("error: ... and {} more message{s} failed with the same error", self.repeats);
            self.repeats = 0;
        }
    }

    async fn finish(mut self) -> Result<Option<Error>, CliError> {
        while !self.window.is_empty() {
            self.settle_one().await?;
        }
        self.report_repeats();
        self.producer.close().await;
        Ok(self.failure)
    }
}

async fn consume(client: &Client, timeout: Duration, output: Output, args: ConsumeArgs) -> Result<(), CliError> {
    // Fail fast (exit 3 or 6) on an unknown queue or an unreachable broker;
    // once consuming, a lost broker is waited for and reconnected to.
    client
        .admin_with_config(AdminConfig { deadline: timeout, ..AdminConfig::default() })
        .get_queue(&args.queue)
        .await?;
    let config = ConsumerConfig {
        prefetch: args.credit,
        // One at a time, so output follows delivery order.
        concurrency: 1,
        max_messages: args.count,
        ..ConsumerConfig::default()
    };
    let consumer = client.consumer(&args.queue, config)?;
    // A failed write (a closed pipe) nacks that delivery and stops the loop.
    let (write_failed, mut write_failure) = tokio::sync::mpsc::channel::<std::io::Error>(1);
    let handle = consumer.spawn(move |delivery: Delivery| {
        let written = output.delivery(&delivery);
        let write_failed = write_failed.clone();
        async move {
            written.map_err(|error| {
                let reason = format!("writing the delivery failed: {error}");
                let _ = write_failed.try_send(error);
                reason
            })
        }
    });
    let stopper = handle.stopper();
    let join = handle.join();
    tokio::pin!(join);
    let mut io_error = None;
    let stats = loop {
        tokio::select! {
            stats = &mut join => break stats?,
            signal = tokio::signal::ctrl_c() => {
                signal?;
                stopper.stop();
            }
            Some(error) = write_failure.recv(), if io_error.is_none() => {
                io_error = Some(error);
                stopper.stop();
            }
        }
    };
    tracing::info!(acked = stats.acked, nacked = stats.nacked, "consumer finished");
    match io_error {
        // `ballast consume q | head -1`: a closed pipe is how the reader says
        // it has enough; not an error.
        Some(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Some(error) => Err(error.into()),
        None => Ok(()),
    }
}

async fn stats(client: &Client, timeout: Duration, output: Output, args: StatsArgs) -> Result<(), CliError> {
    let stats = admin(client, timeout).stats(args.queue.as_deref()).await?;
    output.stats(&stats)?;
    Ok(())
}

/// Redraws the figures at every update of a stats watch. Ends with success
/// on Ctrl-C, after `--iterations` updates, when stdout is closed (`| head`)
/// or when the broker ends the stream cleanly; with the error's exit code
/// when the stream ends with an error (queue deleted, broker gone).
async fn top(client: &Client, timeout: Duration, output: Output, args: TopArgs) -> Result<(), CliError> {
    let iterations = args.iterations();
    let interval = Duration::from_millis(args.interval_ms);
    // Listening for Ctrl-C from the start replaces the default "die at once";
    // nothing needs restoring (no raw mode, no alternate screen), but the
    // exit is then a clean one.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let admin = admin(client, timeout);
    let mut watch = tokio::select! {
        signal = &mut ctrl_c => return Ok(signal?),
        watch = admin.watch_stats(args.queue.as_deref(), interval) => watch?,
    };
    let screen = Screen { addr: client.addr().to_owned(), interval, terminal: std::io::stdout().is_terminal() };
    let mut shown: u64 = 0;
    loop {
        let stats = tokio::select! {
            signal = &mut ctrl_c => return Ok(signal?),
            next = watch.next() => match next {
                Some(stats) => stats?,
                None => return Ok(()),
            },
        };
        match output.frame(&screen, &stats) {
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            written => written?,
        }
        shown += 1;
        if iterations.is_some_and(|iterations| shown >= iterations) {
            return Ok(());
        }
    }
}
