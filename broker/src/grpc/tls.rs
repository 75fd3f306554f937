//! TLS on the gRPC listener (and, with `[metrics] tls`, on the metrics
//! listener): rustls with the `ring` provider, certificates read from PEM
//! files, client certificates verified against `client_ca` (mutual TLS),
//! and reloads without a restart.
//!
//! Rules:
//! 1. The accept loop never waits on a client: each accepted connection
//!    takes its connection permit first (nothing large is held before
//!    that), then its handshake runs in a task of its own, bounded by
//!    [`TLS_HANDSHAKE_TIMEOUT_MS`]. Only a finished handshake reaches the
//!    HTTP/2 server.
//! 2. A handshake uses the configuration current when it starts. A reload
//!    (SIGHUP, or a changed cert/key/CA file seen by the poll every
//!    [`TLS_RELOAD_POLL_MS`]) builds a whole new configuration and swaps it
//!    in for new connections; connections already open keep theirs, so a
//!    rotation closes none. A new configuration that fails to build is
//!    logged and the old one stays.
//! 3. A client certificate's identities (subject common names, DNS and URI
//!    subject alternative names) go into the connection's [`Peer`], where
//!    authentication reads them.
//!
//! [`Peer`]: super::peer::Peer

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::{Mutex, RwLock};
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, StreamExt};

use super::transport::{Connections, Counted};
use crate::{
    config::TlsConfig,
    limits::{
        METRICS_TLS_HANDSHAKES_MAX, TLS_FAILED_LINGER_MS, TLS_FILE_SIZE_MAX, TLS_HANDSHAKE_TIMEOUT_MS,
        TLS_HANDSHAKES_PENDING_MAX, TLS_RELOAD_POLL_MS,
    },
};

/// Why a TLS configuration could not be built from its files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {role} file {path}: {source}")]
    Read { role: &'static str, path: PathBuf, source: io::Error },
    #[error("the TLS {role} file {path} is {size} bytes; the limit is {TLS_FILE_SIZE_MAX}: is it the right file?")]
    TooLarge { role: &'static str, path: PathBuf, size: u64 },
    #[error("the TLS {role} file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { role: &'static str, path: PathBuf },
    #[error("the TLS {role} file {path} is not valid PEM: {message}")]
    BadPem { role: &'static str, path: PathBuf, message: String },
    #[error("the TLS key file {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("the TLS key in {key} does not match the certificate in {cert}: give the key the certificate was made for")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the TLS certificate {cert} with key {key} cannot be served: {message}")]
    Unusable { cert: PathBuf, key: PathBuf, message: String },
    #[error("the TLS client CA file {path} cannot verify client certificates: {message}")]
    ClientCa { path: PathBuf, message: String },
}

/// The files a TLS configuration is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The certificate's private key (PEM).
    pub key: PathBuf,
    /// With it, clients must present a certificate signed by one of its CAs.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files of `[tls]`, or `None` when TLS is off (no certificate).
    pub fn of(config: &TlsConfig) -> Option<TlsFiles> {
        Some(TlsFiles { cert: config.cert.clone()?, key: config.key.clone()?, client_ca: config.client_ca.clone() })
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(self.cert.as_path()), Some(self.key.as_path()), self.client_ca.as_deref()].into_iter().flatten()
    }
}

/// The configurations built from one set of files: the gRPC listener's
/// (HTTP/2, client certificates per `client_ca`) and the metrics
/// listener's (HTTP/1.1, no client certificates, so scrapers need none).
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    /// ALPN `h2`; client certificates required with a client CA.
    pub grpc: Arc<ServerConfig>,
    /// ALPN `http/1.1`; never asks for a client certificate.
    pub metrics: Arc<ServerConfig>,
}

/// Builds both configurations from `files`, checking everything a
/// handshake would need: readable files, a certificate, a key that matches
/// it, and a usable client CA.
pub fn build(files: &TlsFiles) -> Result<TlsConfigs, TlsError> {
    let provider = provider();
    let chain = certificates("certificate", &files.cert)?;
    let key = private_key(&files.key)?;
    let single = |builder: rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>| {
        builder.with_single_cert(chain.clone(), key.clone_key()).map_err(|error| match error {
            rustls::Error::InconsistentKeys(_) => {
                TlsError::KeyMismatch { cert: files.cert.clone(), key: files.key.clone() }
            }
            other => {
                TlsError::Unusable { cert: files.cert.clone(), key: files.key.clone(), message: other.to_string() }
            }
        })
    };
    let versions = |provider: &Arc<CryptoProvider>| {
        ServerConfig::builder_with_provider(Arc::clone(provider)).with_safe_default_protocol_versions().map_err(
            |error| TlsError::Unusable { cert: files.cert.clone(), key: files.key.clone(), message: error.to_string() },
        )
    };
    let grpc_builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("client CA", path)? {
                roots
                    .add(cert)
                    .map_err(|error| TlsError::ClientCa { path: path.clone(), message: error.to_string() })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|error| TlsError::ClientCa { path: path.clone(), message: error.to_string() })?;
            versions(&provider)?.with_client_cert_verifier(verifier)
        }
        None => versions(&provider)?.with_no_client_auth(),
    };
    let mut grpc = single(grpc_builder)?;
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    let mut metrics = single(versions(&provider)?.with_no_client_auth())?;
    metrics.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConfigs { grpc: Arc::new(grpc), metrics: Arc::new(metrics) })
}

/// The `ring` crypto provider: it builds without cmake or a C toolchain
/// beyond cc (aws-lc-rs needs both). rustls 0.23.48 deprecates it for
/// lacking post-quantum key exchange; the classic groups it offers are
/// what our clients (tonic's `tls-ring`) speak too.
#[allow(deprecated, reason = "ring is the provider we build with; see above")]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The identities a verified client certificate (DER) names: its subject's
/// common names, then its DNS and URI subject alternative names, in
/// certificate order, without duplicates. A certificate the parser refuses
/// names none (rustls has verified it already, so that does not happen for
/// a connection's certificate).
pub fn identities(cert: &[u8]) -> Vec<String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(cert) else {
        return Vec::new();
    };
    let mut names: Vec<String> = Vec::new();
    let mut add = |name: &str| {
        if !name.is_empty() && !names.iter().any(|known| known == name) {
            names.push(name.to_owned());
        }
    };
    for common_name in cert.subject().iter_common_name() {
        if let Ok(name) = common_name.as_str() {
            add(name);
        }
    }
    if let Ok(Some(alternatives)) = cert.subject_alternative_name() {
        for name in &alternatives.value.general_names {
            match name {
                GeneralName::DNSName(name) | GeneralName::URI(name) => add(name),
                _ => {}
            }
        }
    }
    names
}

/// The live TLS state of a server: the current configurations and what
/// their files looked like when they were built.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    current: RwLock<TlsConfigs>,
    /// Modification time and size of each of `files` when `current` was
    /// built: a change in any means a reload.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl Tls {
    /// Builds the configurations from `files`; fails as [`build`] does.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let stamps = stamps(&files);
        let current = build(&files)?;
        Ok(Arc::new(Tls { files, current: RwLock::new(current), stamps: Mutex::new(stamps) }))
    }

    /// The gRPC listener's configuration for a new connection.
    pub fn grpc(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().grpc)
    }

    /// The metrics listener's configuration for a new connection.
    pub fn metrics(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().metrics)
    }

    /// Builds new configurations from the files and uses them for new
    /// connections; on failure keeps the current ones and says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = stamps(&self.files);
        // Recorded even on failure: a bad file is reported once, not at
        // every poll, and its next change is tried again.
        *self.stamps.lock() = stamps;
        let configs = build(&self.files)?;
        *self.current.write() = configs;
        Ok(())
    }

    /// Whether a file changed (modification time or size) since the last
    /// build or attempt.
    fn changed(&self) -> bool {
        *self.stamps.lock() != stamps(&self.files)
    }

    /// Reloads on SIGHUP and when a file changes; runs until aborted. The
    /// SIGHUP handler is installed before this returns: a SIGHUP sent
    /// once the server logs that TLS is on is never missed.
    pub fn watch(self: Arc<Tls>) -> impl Future<Output = ()> + Send + 'static {
        use tokio::signal::unix::{SignalKind, signal};
        let hangup = signal(SignalKind::hangup())
            .inspect_err(|error| {
                tracing::warn!(%error, "cannot install the SIGHUP handler; TLS files reload when they change");
            })
            .ok();
        tracing::info!(
            cert = %self.files.cert.display(),
            client_certificates = if self.files.client_ca.is_some() { "required" } else { "not asked for" },
            "TLS on; SIGHUP or a changed file reloads the certificate"
        );
        self.reload_on(hangup)
    }

    async fn reload_on(self: Arc<Tls>, mut hangup: Option<tokio::signal::unix::Signal>) {
        let mut poll = tokio::time::interval(Duration::from_millis(TLS_RELOAD_POLL_MS));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let cause = tokio::select! {
                Some(()) = async { hangup.as_mut()?.recv().await } => "SIGHUP",
                _ = poll.tick() => {
                    if !self.changed() {
                        continue;
                    }
                    "a file changed"
                }
            };
            match self.reload() {
                Ok(()) => tracing::info!(cause, cert = %self.files.cert.display(), "TLS configuration reloaded"),
                Err(error) => {
                    metrics::counter!("ballast_tls_reload_failures_total").increment(1);
                    tracing::error!(cause, %error, "TLS reload failed; the previous certificate stays in use");
                }
            }
        }
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    files
        .paths()
        .map(|path| std::fs::metadata(path).ok().and_then(|meta| Some((meta.modified().ok()?, meta.len()))))
        .collect()
}

/// Reads a PEM file of at most [`TLS_FILE_SIZE_MAX`] bytes.
fn read(role: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let failed = |source| TlsError::Read { role, path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(failed)?;
    let mut text = Vec::new();
    file.take(TLS_FILE_SIZE_MAX + 1).read_to_end(&mut text).map_err(failed)?;
    let size = text.len() as u64;
    if size > TLS_FILE_SIZE_MAX {
        return Err(TlsError::TooLarge { role, path: path.to_owned(), size });
    }
    Ok(text)
}

fn certificates(role: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(role, path)?;
    let chain = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::BadPem { role, path: path.to_owned(), message: error.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { role, path: path.to_owned() });
    }
    Ok(chain)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: path.to_owned() },
        other => TlsError::BadPem { role: "key", path: path.to_owned(), message: other.to_string() },
    })
}

/// Why a connection's handshake did not finish.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("no TLS handshake within {TLS_HANDSHAKE_TIMEOUT_MS} ms")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Failed(io::Error),
}

/// The server side of a handshake on `io` with `config`, bounded by
/// [`TLS_HANDSHAKE_TIMEOUT_MS`]; returns the stream and the client
/// certificate's identities (none without one). After a failed handshake
/// the connection is closed gracefully (see [`linger`]) so the client reads
/// the TLS alert that says why.
pub async fn handshake<IO>(config: Arc<ServerConfig>, io: IO) -> Result<(TlsStream<IO>, Arc<[String]>), HandshakeError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let accept = TlsAcceptor::from(config).accept(io).into_fallible();
    let stream = match tokio::time::timeout(Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS), accept).await {
        Err(_) => return Err(HandshakeError::Timeout),
        Ok(Err((error, io))) => {
            linger(io).await;
            return Err(HandshakeError::Failed(error));
        }
        Ok(Ok(stream)) => stream,
    };
    let names = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).map(|leaf| identities(leaf));
    Ok((stream, Arc::from(names.unwrap_or_default())))
}

/// Closes a connection whose handshake failed the gentle way: our side is
/// shut down and what the client still sends is read and dropped, for at
/// most [`TLS_FAILED_LINGER_MS`]. Dropped at once with unread bytes, the
/// socket would send a reset that can overtake the alert, and a plaintext
/// client would see "broken pipe" instead of an answer it can explain.
async fn linger<IO>(mut io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let drain = async {
        let _ = io.shutdown().await;
        let mut buffer = [0u8; 1024];
        while let Ok(1..) = io.read(&mut buffer).await {}
    };
    let _ = tokio::time::timeout(Duration::from_millis(TLS_FAILED_LINGER_MS), drain).await;
}

/// The connections the gRPC server serves over TLS: a task accepts from
/// `incoming`, counts each connection against `connections` and hands it
/// to a handshake task of its own; finished handshakes come out of the
/// returned stream. The tasks stop when the stream is dropped.
pub fn incoming(
    mut incoming: impl Stream<Item = io::Result<TcpStream>> + Send + Unpin + 'static,
    connections: Connections,
    tls: Arc<Tls>,
) -> impl Stream<Item = io::Result<Counted>> + Send + 'static {
    let (ready, handshaken) = tokio::sync::mpsc::channel::<io::Result<Counted>>(TLS_HANDSHAKES_PENDING_MAX);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = ready.closed() => return,
                accepted = incoming.next() => accepted,
            };
            let stream = match accepted {
                Some(Ok(stream)) => stream,
                Some(Err(error)) => {
                    if ready.send(Err(error)).await.is_err() {
                        return;
                    }
                    continue;
                }
                None => return,
            };
            let Some(counted) = connections.admit(stream) else { continue };
            let config = tls.grpc();
            let ready = ready.clone();
            tokio::spawn(async move {
                let peer = counted.addr_display();
                match counted.secure(config).await {
                    Ok(secured) => {
                        let _ = ready.send(Ok(secured)).await;
                    }
                    Err(error) => {
                        metrics::counter!("ballast_tls_handshake_failures_total").increment(1);
                        tracing::info!(%peer, %error, "connection closed: no TLS session");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(handshaken)
}

/// The metrics listener over TLS, for `axum::serve`: a task accepts and
/// runs each handshake in a task of its own (at most
/// [`METRICS_TLS_HANDSHAKES_MAX`] at once; more are closed at once), so a
/// silent client cannot stall the scrapes of others.
#[derive(Debug)]
pub struct MetricsTlsListener {
    handshaken: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl MetricsTlsListener {
    pub fn new(listener: tokio::net::TcpListener, tls: Arc<Tls>) -> io::Result<MetricsTlsListener> {
        let local = listener.local_addr()?;
        let (ready, handshaken) = tokio::sync::mpsc::channel(METRICS_TLS_HANDSHAKES_MAX);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(METRICS_TLS_HANDSHAKES_MAX));
        let acceptor = tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of descriptors, most likely: give the
                        // process a moment instead of spinning.
                        tracing::warn!(%error, "metrics listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                    tracing::warn!(%peer, "metrics listener: too many TLS handshakes at once; connection closed");
                    continue;
                };
                let (config, ready) = (tls.metrics(), ready.clone());
                tokio::spawn(async move {
                    match handshake(config, stream).await {
                        Ok((stream, _)) => {
                            drop(permit);
                            let _ = ready.send((stream, peer)).await;
                        }
                        Err(error) => tracing::info!(%peer, %error, "metrics connection closed: no TLS session"),
                    }
                });
            }
        });
        Ok(MetricsTlsListener { handshaken, local, acceptor })
    }
}

impl Drop for MetricsTlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for MetricsTlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(accepted) => accepted,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A boxed stream of accepted connections, plaintext or TLS.
pub type Incoming = Pin<Box<dyn Stream<Item = io::Result<Counted>> + Send>>;
