//! Authentication in front of the services: [`admit`] names the
//! principal of every call from its `authorization: Bearer <token>`
//! metadata or its client certificate's identities, before any request
//! body is decoded, and puts it in the request's extensions as a
//! [`Caller`]. A call without valid credentials is answered UNAUTHENTICATED
//! (saying what was wrong) and never reaches a service; health checks stay
//! open, but a queue's entry only answers a caller allowed its stats
//! ([`QueueHealth`]). A peer address past [`AUTH_FAILURES_MAX`] failures in a window is
//! answered RESOURCE_EXHAUSTED with a retry-after hint until the window
//! ends. Without an auth file every call is let through.
//!
//! [`AUTH_FAILURES_MAX`]: crate::limits::AUTH_FAILURES_MAX

use std::{sync::Arc, time::Instant};

use tonic::{
    Status,
    codegen::http,
    metadata::{MetadataMap, MetadataValue},
};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_server::Health};

use super::{peer::Peer, status::RETRY_AFTER_MS};
use crate::auth::{AUDIT_TARGET, Action, Auth, Principal};

/// Path prefix of the health service, open without credentials (probes).
const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

/// Prefix of a queue's entry in the health service.
const QUEUE_HEALTH_PREFIX: &str = "ballast.v1.Queue/";

/// Value of `ballast-reason` on a call refused because its peer failed to
/// authenticate too often.
pub const REASON_AUTH_FAILURES: &str = "auth_failures";

/// The principal a call authenticated as, in its request's extensions.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Principal>);

/// Path prefix of the internal Raft service: its calls need a principal
/// with the `cluster` action on every queue.
const RAFT_PATH: &str = "/ballast.cluster.v1.Raft/";

/// Authenticates `request` against `auth` (nothing to do without an auth
/// file; a health check without a token passes): puts its [`Caller`] in its
/// extensions, or returns the status that answers it. Run by [`StatusService`] once the
/// metadata limit passed, before the call reaches a service.
///
/// [`StatusService`]: super::transport::StatusService
pub fn admit<B>(auth: Option<&Auth>, request: &mut http::Request<B>) -> Result<(), Status> {
    let Some(auth) = auth else { return Ok(()) };
    let peer = Peer::of(request).cloned().unwrap_or_default();
    let principal = if request.uri().path().starts_with(HEALTH_PATH)
        && !request.headers().contains_key(http::header::AUTHORIZATION)
    {
        // Open for probes. A mapped certificate still names the caller,
        // for the per-queue entries ([`QueueHealth`]); a token, when sent,
        // is checked like any other (a health check is no token oracle).
        match auth.principals().by_cert(&peer.cert_identities) {
            Some(principal) => principal,
            None => return Ok(()),
        }
    } else {
        authenticate(auth, request.headers(), &peer, request.uri().path())?
    };
    if request.uri().path().starts_with(RAFT_PATH) && !principal.allows(Action::Cluster, "*") {
        return Err(Status::permission_denied(format!(
            "principal {} may not speak for a cluster node: it needs a rule with queues = \"*\" and the \
             cluster action",
            principal.name
        )));
    }
    request.extensions_mut().insert(Caller(principal));
    Ok(())
}

/// The health service, with the per-queue entries
/// (`ballast.v1.Queue/<name>`) answered only to a caller with `stats` on
/// the queue when an auth file is set: to anyone else a queue's entry is
/// NOT_FOUND, as for a queue that does not exist, so the open health
/// service does not reveal which queues exist. The other entries stay open.
#[derive(Debug)]
pub struct QueueHealth {
    inner: tonic_health::server::HealthService,
    auth_on: bool,
}

impl QueueHealth {
    pub fn new(inner: tonic_health::server::HealthService, auth_on: bool) -> QueueHealth {
        QueueHealth { inner, auth_on }
    }

    fn check_entry(&self, request: &tonic::Request<HealthCheckRequest>) -> Result<(), Status> {
        let service = request.get_ref().service.as_str();
        let Some(queue) = service.strip_prefix(QUEUE_HEALTH_PREFIX) else { return Ok(()) };
        let caller = request.extensions().get::<Caller>();
        if !self.auth_on || caller.is_some_and(|c| c.0.allows(Action::Stats, queue)) {
            Ok(())
        } else {
            // tonic-health's own answer for an unknown entry, word for word.
            Err(Status::not_found("service not registered"))
        }
    }
}

#[tonic::async_trait]
impl Health for QueueHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        self.check_entry(&request)?;
        self.inner.check(request).await
    }

    type WatchStream = tonic_health::server::WatchStream;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        self.check_entry(&request)?;
        self.inner.watch(request).await
    }
}

/// Why a call's credentials were not accepted, as the client and the audit
/// log see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Missing,
    Malformed,
    UnknownToken,
    CertificateNotMapped,
}

impl Failure {
    fn name(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::UnknownToken => "unknown_token",
            Failure::CertificateNotMapped => "certificate_not_mapped",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Failure::Missing => {
                "no credentials: send `authorization: Bearer <token>` metadata or a client certificate that the \
                 auth file maps to a principal"
            }
            Failure::Malformed => "the authorization metadata is malformed: it must be `Bearer <token>`",
            Failure::UnknownToken => "unknown token: no principal of the auth file has it",
            Failure::CertificateNotMapped => "the client certificate is not mapped to a principal in the auth file",
        }
    }
}

/// The principal of a call, or the status that refuses it.
fn authenticate(auth: &Auth, headers: &http::HeaderMap, peer: &Peer, path: &str) -> Result<Arc<Principal>, Status> {
    let ip = peer.addr.map(|a| a.ip());
    let now = Instant::now();
    if let Err(retry_after_ms) = auth.failures.check(ip, now) {
        metrics::counter!("ballast_auth_failures_total", "reason" => "held_off").increment(1);
        tracing::warn!(target: AUDIT_TARGET, principal = "-", peer = %peer.addr_display(), action = "authenticate",
            call = path, outcome = "held_off", retry_after_ms, "authentication refused: too many failures");
        let mut metadata = MetadataMap::new();
        metadata.insert(RETRY_AFTER_MS, MetadataValue::from(retry_after_ms));
        metadata.insert(super::status::REASON, MetadataValue::from_static(REASON_AUTH_FAILURES));
        return Err(Status::with_metadata(
            tonic::Code::ResourceExhausted,
            format!(
                "too many failed authentications from this address; retry in {retry_after_ms} ms with valid \
                 credentials"
            ),
            metadata,
        ));
    }
    let principals = auth.principals();
    let found = match headers.get(http::header::AUTHORIZATION) {
        Some(value) => match bearer(value) {
            Some(token) => principals.by_token(token).ok_or(Failure::UnknownToken),
            None => Err(Failure::Malformed),
        },
        None if peer.cert_identities.is_empty() => Err(Failure::Missing),
        None => principals.by_cert(&peer.cert_identities).ok_or(Failure::CertificateNotMapped),
    };
    found.map_err(|failure| {
        auth.failures.record(ip, now);
        metrics::counter!("ballast_auth_failures_total", "reason" => failure.name()).increment(1);
        tracing::warn!(target: AUDIT_TARGET, principal = "-", peer = %peer.addr_display(), action = "authenticate",
            call = path, outcome = "unauthenticated", reason = failure.name(),
            cert_identities = ?peer.cert_identities, "authentication failed");
        Status::unauthenticated(failure.message())
    })
}

/// The token of `Bearer <token>` (the scheme in any case), if that is
/// what the value holds.
fn bearer(value: &http::HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let (scheme, token) = text.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' ')).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An auth file with a token principal and a certificate principal.
    fn auth() -> (tempfile::TempDir, Arc<Auth>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        let text = format!(
            "[[principals]]\nname = \"svc\"\ntoken_sha256 = \"{}\"\n\
             [[principals]]\nname = \"ops\"\ncert_identity = \"ops.example.internal\"\n",
            crate::auth::token_sha256_hex("tok")
        );
        std::fs::write(&path, text).unwrap();
        let auth = Auth::load(&path).unwrap();
        (dir, auth)
    }

    fn peer(identities: &[&str]) -> Peer {
        Peer {
            addr: Some("10.1.2.3:5000".parse().unwrap()),
            cert_identities: identities.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn headers(authorization: Option<&str>) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(http::header::AUTHORIZATION, http::HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    /// A certificate identity the file maps names its principal (any of
    /// the certificate's identities will do); an unmapped certificate is
    /// UNAUTHENTICATED saying so; a token, when sent, is what counts.
    #[test]
    fn certificates_and_tokens_name_principals() {
        let (_dir, auth) = auth();
        let name = |r: Result<Arc<Principal>, Status>| r.map(|p| p.name.clone()).map_err(|s| s.message().to_owned());
        let path = "/ballast.v1.Admin/ListQueues";
        let mapped = peer(&["client.example", "ops.example.internal"]);
        assert_eq!(name(authenticate(&auth, &headers(None), &mapped, path)), Ok("ops".into()));
        let unmapped = authenticate(&auth, &headers(None), &peer(&["stranger"]), path).unwrap_err();
        assert_eq!(unmapped.code(), tonic::Code::Unauthenticated);
        assert!(unmapped.message().contains("certificate is not mapped"), "{unmapped:?}");
        assert_eq!(name(authenticate(&auth, &headers(Some("Bearer tok")), &mapped, path)), Ok("svc".into()));
        let wrong = authenticate(&auth, &headers(Some("Bearer nope")), &mapped, path).unwrap_err();
        assert!(wrong.message().contains("unknown token"), "a bad token is not rescued by the certificate");
        let missing = authenticate(&auth, &headers(None), &peer(&[]), path).unwrap_err();
        assert!(missing.message().contains("no credentials"), "{missing:?}");
    }

    /// Only `Bearer <token>` (scheme in any case) yields a token.
    #[test]
    fn bearer_values() {
        for (value, expected) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("Bearer  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer", None),
            ("Bearer ", None),
            ("Bearer a b", None),
            ("abc", None),
        ] {
            let value = http::HeaderValue::from_str(value).unwrap();
            assert_eq!(bearer(&value), expected, "{value:?}");
        }
    }
}
