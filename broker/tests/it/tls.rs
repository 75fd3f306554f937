//! TLS on the gRPC listener: round trips, mutual TLS, the client
//! certificate's identities, reloads without a restart, the start-up
//! checks, and the refusal to listen unprotected on a non-loopback address.
//! Certificates are made here with rcgen.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use ballast_broker::grpc::tls::{self, HandshakeError, Tls, TlsError, TlsFiles};
use ballast_proto::v1::{
    admin_client::AdminClient, consumer_client::ConsumerClient, publisher_client::PublisherClient,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::{BrokerProcess, Session, create, message, publish, queue_settings, wait_until};

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Ca { issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate") }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    fn server(&self) -> Leaf {
        let sans = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        ];
        self.issue("ballastd", sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `name` and `sans`.
    fn client(&self, name: &str, sans: Vec<SanType>) -> Leaf {
        self.issue(name, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, name: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf certificate");
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// The server's files in a directory of their own.
struct ServerFiles {
    dir: tempfile::TempDir,
}

impl ServerFiles {
    fn new(ca: &Ca, client_ca: Option<&Ca>) -> ServerFiles {
        let files = ServerFiles { dir: tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir") };
        files.write(&ca.server());
        if let Some(client_ca) = client_ca {
            std::fs::write(files.path("client-ca.pem"), client_ca.pem()).unwrap();
        }
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces the certificate and key, as a rotation does: each file
    /// written aside and renamed into place.
    fn write(&self, leaf: &Leaf) {
        for (name, text) in [("server.pem", &leaf.cert), ("server.key", &leaf.key)] {
            let aside = self.path(&format!("{name}.new"));
            std::fs::write(&aside, text).unwrap();
            std::fs::rename(&aside, self.path(name)).unwrap();
        }
    }

    fn tls_files(&self) -> TlsFiles {
        let client_ca = self.path("client-ca.pem");
        TlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: client_ca.exists().then_some(client_ca),
        }
    }

    /// The broker's flags for these files.
    fn args(&self) -> Vec<String> {
        let files = self.tls_files();
        let mut args =
            vec!["--tls-cert".to_owned(), path_arg(&files.cert), "--tls-key".to_owned(), path_arg(&files.key)];
        if let Some(ca) = files.client_ca {
            args.extend(["--tls-client-ca".to_owned(), path_arg(&ca)]);
        }
        args
    }

    fn start(&self) -> BrokerProcess {
        let args = self.args();
        BrokerProcess::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

fn path_arg(path: &Path) -> String {
    path.to_str().expect("a UTF-8 temp path").to_owned()
}

/// A TLS channel to `broker` trusting `ca`, with a client certificate if
/// given.
async fn connect(broker: &BrokerProcess, ca: &Ca, client: Option<&Leaf>) -> Result<Channel, tonic::transport::Error> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem())).domain_name("localhost");
    if let Some(leaf) = client {
        config = config.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Channel::from_shared(format!("https://{}", broker.addr))
        .unwrap()
        .tls_config(config)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Publishes one message to a new queue `name` over `channel` and consumes
/// it back.
async fn round_trip(channel: Channel, name: &str) {
    let mut admin = AdminClient::new(channel.clone());
    create(&mut admin, name, queue_settings()).await;
    let receipt = publish(&mut PublisherClient::new(channel.clone()), name, message("over tls")).await;
    let mut consumer = ConsumerClient::new(channel);
    let mut session = Session::open(&mut consumer, name, 1).await;
    let delivery = session.delivery().await;
    assert_eq!(delivery.payload.as_ref(), b"over tls");
    assert_eq!(delivery.id.expect("an id").offset, receipt.id.expect("a receipt id").offset);
}

fn log_of(broker: &BrokerProcess) -> String {
    std::fs::read_to_string(broker.data_dir.with_extension("log")).unwrap_or_default()
}

/// A publish and its delivery travel over TLS end to end.
#[tokio::test]
async fn publish_and_consume_over_tls() {
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca, None);
    let broker = files.start();
    let channel = connect(&broker, &ca, None).await.expect("TLS connection");
    round_trip(channel, "tls-round-trip").await;
}

/// A plaintext client gets no gRPC answer from a TLS listener, and the
/// broker logs the failed handshake and stays healthy.
#[tokio::test]
async fn a_plaintext_client_is_refused_by_a_tls_listener() {
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca, None);
    let broker = files.start();
    let plain = Channel::from_shared(broker.endpoint()).unwrap().connect().await;
    let outcome = match plain {
        Ok(channel) => AdminClient::new(channel)
            .list_queues(ballast_proto::v1::ListQueuesRequest {})
            .await
            .err()
            .map(|status| status.to_string()),
        Err(error) => Some(error.to_string()),
    };
    assert!(outcome.is_some(), "a plaintext call on a TLS listener must fail");
    wait_until("the failed handshake in the log", || log_of(&broker).contains("no TLS session")).await;
    round_trip(connect(&broker, &ca, None).await.expect("TLS still serves"), "after-plaintext").await;
}

/// A broker with a certificate of a server CA that requires client
/// certificates of a client CA.
fn mutual_tls() -> (Ca, Ca, ServerFiles, BrokerProcess) {
    let (ca, clients) = (Ca::new("server CA"), Ca::new("client CA"));
    let files = ServerFiles::new(&ca, Some(&clients));
    let broker = files.start();
    (ca, clients, files, broker)
}

/// With a client CA, a client without a certificate (or with one from
/// another CA) is refused; one with a certificate from the CA is served.
#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_client_ca() {
    let (ca, clients, _files, broker) = mutual_tls();
    for client in [None, Some(Ca::new("stranger CA").client("intruder", vec![]))] {
        match connect(&broker, &ca, client.as_ref()).await {
            // TLS 1.3 finishes the client's side of the handshake before
            // the server checks the certificate: the first call fails.
            Ok(channel) => {
                let call = AdminClient::new(channel).list_queues(ballast_proto::v1::ListQueuesRequest {}).await;
                assert!(call.is_err(), "refused without a valid client certificate");
            }
            Err(error) => assert!(!error.to_string().is_empty()),
        }
    }
    let leaf = clients.client("orders-service", vec![]);
    round_trip(connect(&broker, &ca, Some(&leaf)).await.expect("mutual TLS"), "mtls").await;
}

/// A broker serving a certificate of an old CA, and the new CA to rotate to.
fn rotation() -> (Ca, Ca, ServerFiles, BrokerProcess) {
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = ServerFiles::new(&old_ca, None);
    let broker = files.start();
    (old_ca, new_ca, files, broker)
}

/// A rotation on disk reaches new connections without a restart while a
/// connection made before it keeps working; a broken file afterwards is
/// logged and the rotated certificate stays in use.
#[tokio::test]
async fn certificates_reload_without_closing_connections() {
    let (old_ca, new_ca, files, broker) = rotation();
    let before = connect(&broker, &old_ca, None).await.expect("TLS with the old certificate");
    let mut admin = AdminClient::new(before.clone());
    create(&mut admin, "rotation", queue_settings()).await;
    assert!(connect(&broker, &new_ca, None).await.is_err(), "the new CA does not sign the old certificate");

    files.write(&new_ca.server());
    wait_until("the reload in the log", || log_of(&broker).contains("TLS configuration reloaded")).await;
    round_trip(connect(&broker, &new_ca, None).await.expect("TLS with the new certificate"), "after-rotation").await;
    assert!(connect(&broker, &old_ca, None).await.is_err(), "new connections get the new certificate");
    let kept = publish(&mut PublisherClient::new(before.clone()), "rotation", message("still here")).await;
    assert!(kept.id.is_some());

    std::fs::write(files.path("server.key"), "not a key").unwrap();
    wait_until("the failed reload in the log", || log_of(&broker).contains("TLS reload failed")).await;
    round_trip(connect(&broker, &new_ca, None).await.expect("the rotated certificate stays"), "after-bad-file").await;
}

/// SIGHUP reloads the files at once (no wait for the poll), and a client
/// that connects but never starts a handshake holds up no one.
#[tokio::test]
async fn sighup_reloads_and_a_silent_client_stalls_no_one() {
    let (_, new_ca, files, broker) = rotation();
    let _silent = std::net::TcpStream::connect(broker.addr).expect("a silent connection");
    wait_until("the SIGHUP handler", || log_of(&broker).contains("SIGHUP or a changed file reloads")).await;
    files.write(&new_ca.server());
    let pid = libc::pid_t::try_from(broker.pid()).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_until("the SIGHUP reload in the log", || log_of(&broker).contains("\"SIGHUP\"")).await;
    round_trip(connect(&broker, &new_ca, None).await.expect("TLS after SIGHUP"), "after-sighup").await;
}

/// A start with a missing file, a key of another certificate or a file
/// without a certificate stops before listening, with the reason.
#[test]
fn bad_tls_files_stop_the_start_with_the_reason() {
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca, None);
    let other = ca.server();
    std::fs::write(files.path("other.key"), &other.key).unwrap();
    std::fs::write(files.path("empty.pem"), "").unwrap();
    let cert = path_arg(&files.path("server.pem"));
    let key = path_arg(&files.path("server.key"));
    for (cert, key, needle) in [
        (cert.clone(), path_arg(&files.path("missing.key")), "cannot read the TLS key file"),
        (cert.clone(), path_arg(&files.path("other.key")), "does not match the certificate"),
        (path_arg(&files.path("empty.pem")), key.clone(), "holds no PEM certificate"),
        (cert.clone(), cert.clone(), "holds no PEM private key"),
    ] {
        let (code, stderr) = refused_start(&["--tls-cert", &cert, "--tls-key", &key]);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
}

/// On a non-loopback address the broker refuses to start without TLS and
/// authentication, in one line saying why, unless --insecure is given.
#[test]
fn a_non_loopback_address_needs_tls_and_auth_or_insecure() {
    let (code, stderr) = refused_start(&["--listen", "0.0.0.0:0"]);
    assert_eq!(code, Some(2), "{stderr}");
    let line = stderr.lines().find(|line| line.starts_with("ballastd: ")).expect("one line of reason");
    assert!(line.contains("refusing to listen on 0.0.0.0:0 without TLS and authentication"), "{line}");
    assert!(line.contains("--insecure"), "{line}");
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca, None);
    let mut args = files.args();
    args.extend(["--listen".to_owned(), "0.0.0.0:0".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stderr) = refused_start(&args);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("without authentication"), "{stderr}");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let mut insecure = Command::new(env!("CARGO_BIN_EXE_ballastd"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--metrics-listen", "127.0.0.1:0", "--listen", "0.0.0.0:0", "--insecure"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run ballastd");
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(insecure.stdout.take().unwrap()), &mut line);
    insecure.kill().expect("stop ballastd");
    insecure.wait().expect("reap ballastd");
    assert!(line.starts_with("listening on 0.0.0.0:"), "--insecure starts: {line}");
}

/// Runs `ballastd` with `args` (on a fresh data directory), expecting it to
/// exit without listening; returns its exit code and stderr.
fn refused_start(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_ballastd"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .expect("run ballastd");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("listening on"), "it must not listen: {stdout}");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// A verified client certificate's subject common name and its DNS and URI
/// alternative names come out of the handshake (into the connection's
/// `Peer`), in certificate order and without duplicates; no certificate,
/// no identities.
#[tokio::test]
async fn the_client_certificate_identities_come_out_of_the_handshake() {
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let files = ServerFiles::new(&ca, Some(&clients));
    let server = Tls::load(files.tls_files()).expect("server TLS");
    let sans = vec![
        SanType::DnsName("ops.example.internal".try_into().unwrap()),
        SanType::URI("spiffe://example.internal/ops".try_into().unwrap()),
        SanType::DnsName("ops".try_into().unwrap()),
        SanType::Rfc822Name("ops@example.internal".try_into().unwrap()),
    ];
    let leaf = clients.client("ops", sans);
    let identities = handshake_as(&server, &ca, Some(&leaf)).await.expect("mutual TLS handshake");
    assert_eq!(&*identities, ["ops", "ops.example.internal", "spiffe://example.internal/ops"]);

    let plain = ServerFiles::new(&ca, None);
    let server = Tls::load(plain.tls_files()).expect("server TLS");
    assert!(handshake_as(&server, &ca, None).await.expect("TLS handshake").is_empty());
    let der = rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap();
    assert_eq!(tls::identities(&der), ["ops", "ops.example.internal", "spiffe://example.internal/ops"]);
    assert!(tls::identities(b"not a certificate").is_empty());
}

/// The contract with authentication: a connection that finished mutual
/// TLS carries its client's address and certificate identities in its
/// `Peer` (the ConnectInfo tonic copies into every request), and holds its
/// connection permit from the accept on, through the handshake.
#[tokio::test]
async fn a_secured_connection_carries_its_identities_in_its_peer() {
    use tonic::transport::server::Connected;
    let (ca, clients) = (Ca::new("server CA"), Ca::new("client CA"));
    let files = ServerFiles::new(&ca, Some(&clients));
    let server = Tls::load(files.tls_files()).expect("server TLS");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let leaf = clients.client("billing", vec![SanType::URI("spiffe://example.internal/billing".try_into().unwrap())]);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&ca, Some(&leaf))));
    let client = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let local = tcp.local_addr()?;
        let mut stream = connector.connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp).await?;
        let mut byte = [0u8; 1];
        let _ = stream.read(&mut byte).await;
        Ok::<_, std::io::Error>(local)
    });
    let connections = ballast_broker::grpc::transport::Connections::new(1);
    let (stream, _) = listener.accept().await.unwrap();
    let counted = connections.admit(stream).expect("the first connection is admitted");
    let extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    drop(extra);
    let (second, _) = listener.accept().await.unwrap();
    assert!(connections.admit(second).is_none(), "the permit is held during the handshake");
    let secured = counted.secure(server.grpc()).await.expect("mutual TLS handshake");
    let peer = secured.connect_info();
    assert_eq!(&*peer.cert_identities, ["billing", "spiffe://example.internal/billing"]);
    drop(secured);
    let local = client.await.unwrap().expect("the client's side");
    assert_eq!(peer.addr, Some(local));
}

use rustls::pki_types::pem::PemObject;

/// Runs a handshake between `server` and a rustls client over an in-memory
/// pipe; returns the identities the server saw.
async fn handshake_as(server: &Tls, ca: &Ca, client: Option<&Leaf>) -> Result<Arc<[String]>, HandshakeError> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca, client)));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let client_side = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut stream = connector.connect(name, client_io).await?;
        // TLS 1.3 servers answer the client's certificate after the
        // handshake; reading waits for the server's verdict.
        let mut byte = [0u8; 1];
        let _ = stream.read(&mut byte).await;
        Ok::<_, std::io::Error>(())
    });
    let result = tls::handshake(server.grpc(), server_io).await.map(|(_, identities)| identities);
    drop(client_side);
    result
}

fn client_config(ca: &Ca, client: Option<&Leaf>) -> rustls::ClientConfig {
    client_config_for(ca, client, b"h2")
}

fn client_config_for(ca: &Ca, client: Option<&Leaf>, protocol: &[u8]) -> rustls::ClientConfig {
    #[allow(deprecated, reason = "the broker builds with ring")]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![protocol.to_vec()];
    config
}

/// A client that connects and says nothing is dropped at the handshake
/// timeout: still waiting 1 ms before it, gone 1 ms after.
#[tokio::test(start_paused = true)]
async fn a_silent_handshake_ends_at_the_timeout() {
    use ballast_broker::limits::TLS_HANDSHAKE_TIMEOUT_MS;
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca, None);
    let server = Tls::load(files.tls_files()).expect("server TLS");
    let (_client_io, server_io) = tokio::io::duplex(1024);
    let handshake = tokio::spawn(tls::handshake(server.grpc(), server_io));
    tokio::time::advance(Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS - 1)).await;
    tokio::task::yield_now().await;
    assert!(!handshake.is_finished(), "the handshake may wait up to the timeout");
    tokio::time::advance(Duration::from_millis(2)).await;
    let result = handshake.await.expect("the handshake task");
    assert!(matches!(result, Err(HandshakeError::Timeout)), "{:?}", result.map(|_| ()));
}

/// A client that sends something other than TLS and then stays open is
/// read from (so it can read the alert) for `TLS_FAILED_LINGER_MS`, not
/// longer: still held 1 ms before, let go 1 ms after.
#[tokio::test(start_paused = true)]
async fn a_failed_handshake_lingers_for_its_limit() {
    use ballast_broker::limits::TLS_FAILED_LINGER_MS;
    use tokio::io::AsyncWriteExt;
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca, None);
    let server = Tls::load(files.tls_files()).expect("server TLS");
    let (mut client_io, server_io) = tokio::io::duplex(64 * 1024);
    client_io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let handshake = tokio::spawn(tls::handshake(server.grpc(), server_io));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::advance(Duration::from_millis(TLS_FAILED_LINGER_MS - 1)).await;
    tokio::task::yield_now().await;
    assert!(!handshake.is_finished(), "the connection lingers up to the limit");
    tokio::time::advance(Duration::from_millis(2)).await;
    let result = handshake.await.expect("the handshake task");
    assert!(matches!(result, Err(HandshakeError::Failed(_))), "{:?}", result.map(|_| ()));
    drop(client_io);
}

/// The certificate, key and CA files are read up to `TLS_FILE_SIZE_MAX`
/// bytes: a file at the limit loads, one byte more is refused by name.
#[test]
fn tls_files_are_read_up_to_their_size_limit() {
    use ballast_broker::limits::TLS_FILE_SIZE_MAX;
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca, None);
    let cert = std::fs::read_to_string(files.path("server.pem")).unwrap();
    let padding = usize::try_from(TLS_FILE_SIZE_MAX).unwrap() - cert.len();
    std::fs::write(files.path("server.pem"), format!("{cert}{}", "\n".repeat(padding))).unwrap();
    tls::build(&files.tls_files()).expect("a file at the limit loads");
    std::fs::write(files.path("server.pem"), format!("{cert}{}", "\n".repeat(padding + 1))).unwrap();
    let error = tls::build(&files.tls_files()).expect_err("one byte more is refused");
    assert!(matches!(error, TlsError::TooLarge { role: "certificate", .. }), "{error}");
    assert!(error.to_string().contains("server.pem"), "{error}");
}

/// Starts a broker serving `/metrics` over TLS with a certificate of `ca`
/// (and a client CA, which the metrics listener ignores).
fn metrics_tls_broker(ca: &Ca) -> (ServerFiles, BrokerProcess) {
    let files = ServerFiles::new(ca, Some(&Ca::new("client CA")));
    std::fs::write(files.path("ballast.toml"), "[metrics]\ntls = true\n").unwrap();
    let mut args = files.args();
    args.extend(["--config".to_owned(), path_arg(&files.path("ballast.toml"))]);
    let broker = BrokerProcess::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    (files, broker)
}

/// `GET /metrics` over TLS trusting `ca`: the response's text.
async fn scrape_tls(broker: &BrokerProcess, ca: &Ca) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config_for(ca, None, b"http/1.1")));
    let tcp = tokio::net::TcpStream::connect(broker.metrics_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.expect("TLS to the metrics listener");
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
}

/// The metrics listener runs `METRICS_TLS_HANDSHAKES_MAX` handshakes at
/// once: with one fewer silent clients a scrape still gets through; past
/// it a new connection is closed at once, and said so in the log.
#[tokio::test]
async fn metrics_tls_handshakes_at_the_limit_and_past() {
    use ballast_broker::limits::METRICS_TLS_HANDSHAKES_MAX;
    use tokio::io::AsyncReadExt;
    let ca = Ca::new("server CA");
    let (_files, broker) = metrics_tls_broker(&ca);
    let mut silent = Vec::new();
    for _ in 0..METRICS_TLS_HANDSHAKES_MAX - 1 {
        silent.push(tokio::net::TcpStream::connect(broker.metrics_addr).await.unwrap());
    }
    let response = scrape_tls(&broker, &ca).await;
    assert!(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"), "{response}");
    silent.push(tokio::net::TcpStream::connect(broker.metrics_addr).await.unwrap());
    let mut past = tokio::net::TcpStream::connect(broker.metrics_addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), past.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "closed at once: {read:?}");
    wait_until("the refusal in the log", || log_of(&broker).contains("too many TLS handshakes at once")).await;
}

/// With `[metrics] tls = true` the metrics endpoint answers over TLS with
/// the listener's certificate (no client certificate asked, even with a
/// client CA) and gives a plaintext scrape nothing.
#[tokio::test]
async fn metrics_are_served_over_tls_when_asked() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = Ca::new("server CA");
    let (_files, broker) = metrics_tls_broker(&ca);
    let response = scrape_tls(&broker, &ca).await;
    assert!(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("# TYPE ballast_"), "{response}");

    let mut plain = tokio::net::TcpStream::connect(broker.metrics_addr).await.unwrap();
    plain.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!answer.starts_with(b"HTTP/"), "a plaintext scrape gets no HTTP answer");
}

fn library_config(ca: &Ca, client: Option<&Leaf>) -> ballast_client::ClientConfig {
    let mut tls = ballast_client::TlsConfig::new(ca.pem().into_bytes().into());
    tls.client_cert = client.map(|leaf| leaf.cert.clone().into_bytes().into());
    tls.client_key = client.map(|leaf| leaf.key.clone().into_bytes().into());
    ballast_client::ClientConfig { tls: Some(tls), ..ballast_client::ClientConfig::default() }
}

/// The error a library client gets connecting to `broker` and listing its
/// queues with `config`.
async fn library_error(broker: &BrokerProcess, config: ballast_client::ClientConfig) -> ballast_client::Error {
    let addr = broker.addr.to_string();
    let client = match ballast_client::Client::connect_with_config(&addr, config).await {
        Ok(client) => client,
        Err(error) => return error,
    };
    let admin = client.admin_with_config(ballast_client::AdminConfig {
        deadline: Duration::from_secs(5),
        ..ballast_client::AdminConfig::default()
    });
    admin.list_queues().await.expect_err("the call must fail")
}

/// The client library says that TLS failed, and what to change, for each
/// way it can: a plaintext client on a TLS listener, a CA that did not sign
/// the broker's certificate, no client certificate or one from another CA
/// under mutual TLS, and a TLS client on a plaintext listener. With the
/// right settings the same client publishes.
#[tokio::test]
async fn the_client_library_says_how_tls_failed() {
    let (ca, clients, _files, broker) = mutual_tls();
    let plain_broker = BrokerProcess::start();
    let stranger = Ca::new("stranger CA").client("intruder", vec![]);
    let cases = [
        (&broker, ballast_client::ClientConfig::default(), "the broker speaks TLS and this client does not"),
        (&broker, library_config(&clients, None), "not signed by the given CA"),
        (&broker, library_config(&ca, None), "the broker requires a client certificate"),
        (&broker, library_config(&ca, Some(&stranger)), "the broker refused the client certificate"),
        (&plain_broker, library_config(&ca, None), "the broker does not speak TLS on this port"),
    ];
    for (target, config, needle) in cases {
        let error = library_error(target, config).await;
        assert!(matches!(error, ballast_client::Error::Tls { .. }), "{needle}: {error:?}");
        assert!(!error.is_retryable());
        let text = error.to_string();
        assert!(text.starts_with("TLS failed: ") && text.contains(needle), "{needle}: {text}");
    }
    let leaf = clients.client("orders-service", vec![]);
    let client =
        ballast_client::Client::connect_with_config(&broker.addr.to_string(), library_config(&ca, Some(&leaf)))
            .await
            .expect("mutual TLS");
    assert!(client.addr().starts_with("https://"), "{}", client.addr());
    client.admin().create_queue("library", ballast_client::QueueSettings::default()).await.expect("create");
    let producer = client.producer(ballast_client::ProducerConfig::default()).expect("producer");
    producer.publish("library", ballast_client::Message::new("over mutual tls")).await.expect("publish");
    assert_eq!(client.admin().get_queue("library").await.expect("get").depth, 1);
}

/// With mutual TLS and an auth file, a client certificate's identity (here
/// a DNS SAN) names its principal end to end: the principal's rules apply,
/// and a certificate the file does not map is UNAUTHENTICATED.
#[tokio::test]
async fn a_client_certificate_names_its_principal() {
    let (ca, clients) = (Ca::new("server CA"), Ca::new("client CA"));
    let files = ServerFiles::new(&ca, Some(&clients));
    let auth = files.path("auth.toml");
    std::fs::write(
        &auth,
        "[[principals]]\nname = \"ops\"\ncert_identity = \"ops.example.internal\"\n\
         allow = [ { queues = \"ops*\", actions = [\"admin\", \"publish\"] } ]\n",
    )
    .unwrap();
    let mut args = files.args();
    args.extend(["--auth-file".to_owned(), path_arg(&auth)]);
    let broker = BrokerProcess::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let ops = clients.client("ops client", vec![SanType::DnsName("ops.example.internal".try_into().unwrap())]);
    let mut admin = AdminClient::new(connect(&broker, &ca, Some(&ops)).await.expect("mutual TLS"));
    create(&mut admin, "ops-jobs", queue_settings()).await;
    let denied = admin
        .create_queue(ballast_proto::v1::CreateQueueRequest {
            name: "payments".into(),
            settings: Some(queue_settings()),
        })
        .await
        .expect_err("ops may not create payments");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("payments"), "{denied:?}");

    let stranger = clients.client("someone else", vec![]);
    let mut admin = AdminClient::new(connect(&broker, &ca, Some(&stranger)).await.expect("mutual TLS"));
    let refused = admin
        .list_queues(ballast_proto::v1::ListQueuesRequest {})
        .await
        .expect_err("an unmapped certificate names no principal");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}

/// A cluster whose nodes serve TLS speaks TLS between its nodes too
/// (`cluster.ca`): three real processes elect a leader over it and a
/// replicated queue's message reaches every node.
#[tokio::test]
async fn a_tls_cluster_replicates_over_tls() {
    let ca = Ca::new("cluster CA");
    let files = ServerFiles::new(&ca, None);
    std::fs::write(files.path("ca.pem"), ca.pem()).unwrap();
    let listens: Vec<std::net::SocketAddr> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port"))
        .collect();
    let peers: Vec<String> =
        listens.iter().enumerate().map(|(i, addr)| format!("{{ id = {}, addr = \"{addr}\" }}", i + 1)).collect();
    let nodes: Vec<BrokerProcess> = listens
        .iter()
        .enumerate()
        .map(|(i, &listen)| {
            let config = files.path(&format!("node{}.toml", i + 1));
            let text = format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[cluster]\nnode_id = {}\npeers = [{}]\nheartbeat_ms = 200\n\
                 election_timeout_min_ms = 1500\nelection_timeout_max_ms = 3000\nca = \"{}\"\n",
                path_arg(&files.path("server.pem")),
                path_arg(&files.path("server.key")),
                i + 1,
                peers.join(", "),
                path_arg(&files.path("ca.pem")),
            );
            std::fs::write(&config, text).unwrap();
            BrokerProcess::start_at(listen, &["--config", &path_arg(&config)])
        })
        .collect();
    let stats = |i: usize| {
        let (node, ca) = (&nodes[i], &ca);
        async move {
            let channel = connect(node, ca, None).await.ok()?;
            let mut stats = ballast_proto::v1::stats_client::StatsClient::new(channel);
            stats.get_stats(ballast_proto::v1::StatsRequest { queue: String::new() }).await.ok().map(|r| r.into_inner())
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let mut found = None;
        for i in 0..3 {
            if stats(i).await.and_then(|s| s.cluster).is_some_and(|c| c.role == "leader" && c.leader_id == c.node_id) {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        assert!(std::time::Instant::now() < deadline, "no leader over TLS: {}", log_of(&nodes[0]));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Through the leader, again if an election under a loaded machine moved
    // the leadership meanwhile (UNAVAILABLE names the new leader).
    let mut at = leader;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let channel = connect(&nodes[at], &ca, None).await.expect("TLS to the leader");
        let settings = ballast_proto::v1::QueueSettings { replicas: Some(3), ..Default::default() };
        let request = ballast_proto::v1::CreateQueueRequest { name: "secured".into(), settings: Some(settings) };
        let created = AdminClient::new(channel.clone()).create_queue(request).await;
        let published = match created {
            Ok(_) => {
                let request =
                    ballast_proto::v1::PublishRequest { queue: "secured".into(), message: Some(message("over tls")) };
                PublisherClient::new(channel).publish(request).await.map(drop)
            }
            Err(status) => Err(status),
        };
        match published {
            Ok(()) => break,
            Err(status) if status.code() == tonic::Code::Unavailable && std::time::Instant::now() < deadline => {
                let named = status.metadata().get("ballast-leader").and_then(|v| v.to_str().ok());
                at = named.and_then(|a| nodes.iter().position(|n| n.addr.to_string() == a)).unwrap_or(at);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("create and publish over TLS: {status:?}"),
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let depth = stats(i).await.and_then(|s| s.queues.into_iter().find(|q| q.name == "secured"));
            if depth.and_then(|q| q.saturation).is_some_and(|s| s.depth == 1) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node {} never got the message: {}", i + 1, log_of(node));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
