//! The client and the CLI against a broker with an auth file: `ballast
//! token new` makes a token the broker accepts; the token goes out from
//! `ClientConfig::token`, `--token-file` and `BALLAST_TOKEN`; and failures
//! say whether the token or a permission failed.

use std::process::{Command, Output};

use ballast_client::{Client, ClientConfig, Error, Message, ProducerConfig, QueueSettings};

use crate::support::Broker;

/// `ballast --json token new NAME`: the token and its hash.
fn new_token(name: &str) -> (String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ballast")).args(["--json", "token", "new", name]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(value["name"], name);
    let token = value["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64, "256 bits in hex");
    (token, value["token_sha256"].as_str().unwrap().to_owned())
}

struct Setup {
    broker: Broker,
    dir: tempfile::TempDir,
    admin_token: String,
    publisher_token: String,
}

/// A broker whose auth file has an admin (everything on every queue) and
/// a publisher (publish only), both made by `ballast token new`.
fn setup() -> Setup {
    let (admin_token, admin_hash) = new_token("admin");
    let (publisher_token, publisher_hash) = new_token("publisher");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    let file = format!(
        "[[principals]]\nname = \"admin\"\ntoken_sha256 = \"{admin_hash}\"\n\
         allow = [ {{ queues = \"*\", actions = [\"publish\", \"consume\", \"admin\", \"stats\"] }} ]\n\
         [[principals]]\nname = \"publisher\"\ntoken_sha256 = \"{publisher_hash}\"\n\
         allow = [ {{ queues = \"*\", actions = [\"publish\"] }} ]\n"
    );
    std::fs::write(&path, file).unwrap();
    let broker = Broker::start_with(&["--auth-file", path.to_str().unwrap()]);
    Setup { broker, dir, admin_token, publisher_token }
}

fn client(broker: &Broker, token: Option<&str>) -> Client {
    let config = ClientConfig { token: token.map(str::to_owned), ..ClientConfig::default() };
    Client::with_config(&broker.url(), config).unwrap()
}

/// Without a token the client gets `Error::Unauthenticated` (not retried);
/// with the admin's token it works; the publisher's token publishes but
/// gets `Error::PermissionDenied` naming the action on admin calls.
#[tokio::test]
async fn the_library_sends_its_token_and_types_the_failures() {
    let setup = setup();
    let admin = client(&setup.broker, Some(&setup.admin_token)).admin();
    admin.create_queue("jobs", QueueSettings::default()).await.expect("the admin's token works");
    let error = client(&setup.broker, None).admin().list_queues().await.unwrap_err();
    assert!(matches!(error, Error::Unauthenticated { .. }), "{error:?}");
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("unauthenticated (check the token"), "{error}");
    let wrong = client(&setup.broker, Some("0000")).admin().list_queues().await.unwrap_err();
    assert!(matches!(&wrong, Error::Unauthenticated { message } if message.contains("unknown token")), "{wrong:?}");
    let publisher = client(&setup.broker, Some(&setup.publisher_token));
    let producer = publisher.producer(ProducerConfig::default()).unwrap();
    producer.publish("jobs", Message::new("m")).await.expect("the publisher may publish");
    let denied = publisher.admin().purge_queue("jobs").await.unwrap_err();
    assert!(matches!(&denied, Error::PermissionDenied { message } if message.contains("admin")), "{denied:?}");
    assert!(!denied.is_retryable());
    assert!(
        Client::with_config("127.0.0.1:1", ClientConfig { token: Some("a b".into()), ..ClientConfig::default() })
            .is_err(),
        "a token with a space cannot be sent"
    );
}

fn ballast(setup: &Setup, args: &[&str], env_token: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ballast"));
    command.arg("--addr").arg(setup.broker.url()).args(args).env_remove("BALLAST_ADDR").env_remove("BALLAST_TOKEN");
    if let Some(token) = env_token {
        command.env("BALLAST_TOKEN", token);
    }
    command.output().unwrap()
}

/// The CLI takes its token from `--token-file` or `BALLAST_TOKEN`; without
/// one, or with a principal that may not, it exits 7 saying which.
#[test]
fn the_cli_takes_a_token_file_or_the_environment() {
    let setup = setup();
    let file = setup.dir.path().join("admin.token");
    std::fs::write(&file, format!("{}\n", setup.admin_token)).unwrap();
    let file = file.to_str().unwrap();
    let created = ballast(&setup, &["--token-file", file, "queue", "create", "jobs"], None);
    assert!(created.status.success(), "{created:?}");
    let listed = ballast(&setup, &["queue", "list"], Some(&setup.admin_token));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("jobs"), "{listed:?}");
    let anonymous = ballast(&setup, &["queue", "list"], None);
    assert_eq!(anonymous.status.code(), Some(7), "{anonymous:?}");
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("unauthenticated"), "{anonymous:?}");
    let denied = ballast(&setup, &["consume", "jobs", "--count", "1"], Some(&setup.publisher_token));
    assert_eq!(denied.status.code(), Some(7), "{denied:?}");
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("permission denied") && stderr.contains("\"publisher\""), "{stderr}");
}
