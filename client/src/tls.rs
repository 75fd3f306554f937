//! [`TlsConfig`]: how a [`Client`](crate::Client) checks the broker's
//! certificate and, for mutual TLS, which certificate it shows; and how TLS
//! failures are told apart from other transport failures.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::Error;

/// PEM text: a file to read when the client is made, or the text itself.
/// Its `Debug` output shows a file's path but never the text (it may be a
/// private key).
#[derive(Clone, PartialEq, Eq)]
pub enum Pem {
    /// A file holding PEM text.
    File(PathBuf),
    /// The PEM text.
    Bytes(Vec<u8>),
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pem::File(path) => f.debug_tuple("File").field(path).finish(),
            Pem::Bytes(bytes) => write!(f, "Bytes(<{} bytes>)", bytes.len()),
        }
    }
}

impl Pem {
    fn load(&self, role: &str) -> Result<Vec<u8>, Error> {
        match self {
            Pem::Bytes(bytes) => Ok(bytes.clone()),
            Pem::File(path) => std::fs::read(path).map_err(|error| Error::Tls {
                message: format!("cannot read the {role} file {}: {error}", path.display()),
            }),
        }
    }
}

impl From<PathBuf> for Pem {
    fn from(path: PathBuf) -> Pem {
        Pem::File(path)
    }
}

impl From<Vec<u8>> for Pem {
    fn from(bytes: Vec<u8>) -> Pem {
        Pem::Bytes(bytes)
    }
}

/// TLS settings of a [`Client`](crate::Client): with them the client speaks
/// TLS (a bare `host:port` address gets `https://`) and trusts only `ca`.
///
/// ```
/// use ballast_client::{ClientConfig, Pem, TlsConfig};
///
/// let tls = TlsConfig {
///     client_cert: Some(Pem::File("client.pem".into())),
///     client_key: Some(Pem::File("client.key".into())),
///     ..TlsConfig::new(Pem::File("ca.pem".into()))
/// };
/// let config = ClientConfig { tls: Some(tls), ..ClientConfig::default() };
/// assert!(config.tls.is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The CA certificate(s) that signed the broker's certificate.
    pub ca: Pem,
    /// The client's certificate, for a broker that requires one (mutual
    /// TLS); needs `client_key`.
    pub client_cert: Option<Pem>,
    /// The client certificate's private key.
    pub client_key: Option<Pem>,
    /// The name the broker's certificate must carry; by default the host of
    /// the address.
    pub domain: Option<String>,
}

impl TlsConfig {
    /// Trust `ca`; no client certificate.
    pub fn new(ca: Pem) -> TlsConfig {
        TlsConfig { ca, client_cert: None, client_key: None, domain: None }
    }

    /// Reads the files and builds tonic's configuration.
    pub(crate) fn tonic(&self) -> Result<ClientTlsConfig, Error> {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.ca.load("TLS CA")?));
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(cert.load("TLS client certificate")?, key.load("TLS client key")?);
                config = config.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(Error::Tls {
                    message: "a client certificate needs its key and a key its certificate (--tls-cert with --tls-key)"
                        .to_owned(),
                });
            }
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

/// What a transport failure's text says about TLS, as advice a person can
/// act on; `None` if it is not about TLS.
pub(crate) fn advice(chain: &str) -> Option<String> {
    let lower = chain.to_ascii_lowercase();
    let advice = if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        "the broker's certificate is not signed by the given CA: pass the CA that signed it (--tls-ca)"
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        "the broker's certificate does not name the host connected to: connect by a name it carries"
    } else if lower.contains("certificaterequired") || lower.contains("certificate required") {
        "the broker requires a client certificate: pass one signed by its client CA (--tls-cert, --tls-key)"
    } else if lower.contains("badcertificate")
        || lower.contains("bad certificate")
        || lower.contains("unknownca")
        || lower.contains("unknown ca")
    {
        "the broker refused the client certificate: it must be signed by the broker's client CA"
    } else if lower.contains("corrupt message") || lower.contains("invalidcontenttype") {
        "the broker does not speak TLS on this port: drop the TLS settings (--tls-ca) or check the address"
    } else if lower.contains("frame with invalid size") {
        // A TLS alert record read as an HTTP/2 frame header claims a
        // frame of over a megabyte: the broker speaks TLS, the client not.
        "the broker speaks TLS and this client does not: connect with https:// and the broker's CA (--tls-ca)"
    } else if lower.contains("tls") || lower.contains("certificate") || lower.contains("handshake") {
        "check the TLS settings (--tls-ca, --tls-cert, --tls-key) against the broker's"
    } else {
        return None;
    };
    Some(format!("{advice} ({chain})"))
}
