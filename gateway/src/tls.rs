//! TLS with rustls: terminate client connections, and verify `https://` backends.
//!
//! Serving: [`TlsReloader`] holds the certificate and key paths and the `ServerConfig` built
//! from them. Each accepted connection takes an [`acceptor`](TlsReloader::acceptor) from
//! the current config, so a [`reload`](TlsReloader::reload) (on SIGHUP) affects new
//! connections only and never disturbs streams in flight. A reload that fails leaves the
//! old certificate in force. ALPN offers `h2` and `http/1.1`; the connection server then
//! speaks whichever the client chose.
//!
//! Upstream: [`upstream_tls`] builds the connector the backend client uses for `https://`
//! backends, verified against the system roots or a CA file.
//!
//! Everything uses the `ring` provider explicitly rather than rustls' process-wide default,
//! so no start-up code has to install one and tests cannot race to do it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The ALPN protocols the gateway offers, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A TLS setup problem, naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// A file has a PEM block that does not decode.
    #[error("{what} file {path} is not valid PEM: {reason}")]
    Pem {
        what: &'static str,
        path: String,
        reason: String,
    },
    /// The certificate file holds no certificate.
    #[error(
        "certificate file {path} holds no certificate (expected a PEM 'BEGIN CERTIFICATE' block)"
    )]
    NoCertificate { path: String },
    /// The key file holds no private key rustls can use.
    #[error("private key file {path} holds no private key (expected an unencrypted PEM 'BEGIN PRIVATE KEY', 'BEGIN RSA PRIVATE KEY' or 'BEGIN EC PRIVATE KEY' block)")]
    NoPrivateKey { path: String },
    /// The private key belongs to another certificate.
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    /// rustls refused the certificate and key for another reason (say, an unsupported key type).
    #[error("cannot use certificate {cert} with private key {key}: {source}")]
    Unusable {
        cert: String,
        key: String,
        source: rustls::Error,
    },
    /// The CA file holds no certificate that can serve as a trust anchor.
    #[error("CA file {path} holds no usable CA certificate")]
    NoCaCertificate { path: String },
    /// The client configuration could not be built.
    #[error("cannot build the TLS client configuration: {0}")]
    Client(rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// === serving ===

/// The server certificate in force, reloadable without a restart.
///
/// The config sits behind a lock that is taken once per accepted connection, for the time
/// of one `Arc` clone; reloads are rare, so contention is not a concern.
pub struct TlsReloader {
    current: RwLock<Current>,
}

struct Current {
    cert: PathBuf,
    key: PathBuf,
    config: Arc<ServerConfig>,
}

impl fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cur = self.read();
        f.debug_struct("TlsReloader")
            .field("cert", &cur.cert)
            .field("key", &cur.key)
            .finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Read a PEM certificate chain (leaf first) and its PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsReloader, TlsError> {
        let config = server_config(cert, key)?;
        Ok(TlsReloader {
            current: RwLock::new(Current {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                config: Arc::new(config),
            }),
        })
    }

    /// Read the same two files again, for a certificate renewed in place.
    ///
    /// On error the previous certificate stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (cert, key) = {
            let cur = self.read();
            (cur.cert.clone(), cur.key.clone())
        };
        self.reload_from(&cert, &key)
    }

    /// Switch to another certificate and key, for a config reload that changed the paths.
    ///
    /// On error the previous certificate and paths stay in force.
    pub fn reload_from(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        // Built before taking the lock: file reads must not stall accepting connections.
        let config = Arc::new(server_config(cert, key)?);
        let mut cur = self.current.write().unwrap_or_else(PoisonError::into_inner);
        *cur = Current {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            config,
        };
        Ok(())
    }

    /// An acceptor for one new connection, using the certificate in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }

    /// The server configuration in force now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.read().config.clone()
    }

    /// The certificate file in force.
    pub fn cert_path(&self) -> PathBuf {
        self.read().cert.clone()
    }

    /// The private key file in force.
    pub fn key_path(&self) -> PathBuf {
        self.read().key.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        // Nothing panics while holding the lock, and a half-written `Current` cannot exist
        // (it is replaced whole), so a poisoned lock still holds a usable value.
        self.current.read().unwrap_or_else(PoisonError::into_inner)
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain = certs_from_pem(&read(cert, "certificate")?, cert, "certificate")?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.display().to_string(),
        });
    }
    let key_der = key_from_pem(&read(key, "private key")?, key)?;
    let unusable = |source| TlsError::Unusable {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(unusable)?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: cert.display().to_string(),
                    key: key.display().to_string(),
                }
            }
            other => unusable(other),
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Every certificate in a PEM file, in order; other blocks (keys, parameters) are skipped.
fn certs_from_pem(
    pem: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e, path, what))
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
fn key_from_pem(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.display().to_string(),
        },
        other => pem_error(other, path, "private key"),
    })
}

fn pem_error(e: pem::Error, path: &Path, what: &'static str) -> TlsError {
    TlsError::Pem {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

// === upstream ===

/// The TLS connector for `https://` backends.
///
/// Certificates are verified against `ca_file` alone when it is given (a private mesh CA
/// should not also trust every public CA), else against the system store. Only HTTP/1.1 is
/// offered, as llama-server speaks nothing else.
pub fn upstream_tls(ca_file: Option<&Path>) -> Result<TlsConnector, TlsError> {
    let roots = match ca_file {
        Some(path) => ca_roots(path)?,
        None => system_roots(),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Client)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

fn ca_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let certs = certs_from_pem(&read(path, "CA")?, path, "CA")?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::NoCaCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(roots)
}

/// The operating system's trust store. An empty or partly unreadable store is not fatal:
/// most deployments have only `http://` backends, and an `https://` one would then fail
/// with a certificate error that names the cause.
fn system_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for err in &found.errors {
        tracing::debug!(error = %err, "skipped part of the system certificate store");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!(
            "no system CA certificates found; https:// backends will fail verification unless a CA file is configured"
        );
    } else {
        tracing::debug!(added, ignored, "loaded system CA certificates");
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn certificates_are_read_in_order_and_other_blocks_are_skipped() {
        let (c1, k1) = self_signed();
        let (c2, _) = self_signed();
        let pem = format!("{c1}{k1}{c2}");
        let certs = certs_from_pem(pem.as_bytes(), Path::new("chain.pem"), "certificate").unwrap();
        assert_eq!(certs.len(), 2);
        let first = CertificateDer::from_pem_slice(c1.as_bytes()).unwrap();
        assert_eq!(certs[0], first);
        assert!(
            certs_from_pem(k1.as_bytes(), Path::new("k.pem"), "certificate")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_key_is_found_after_a_certificate_in_a_combined_file() {
        let (c, k) = self_signed();
        let pem = format!("{c}{k}");
        assert!(key_from_pem(pem.as_bytes(), Path::new("both.pem")).is_ok());
        let err = key_from_pem(c.as_bytes(), Path::new("/etc/gw/cert-only.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/gw/cert-only.pem") && err.contains("no private key"),
            "{err}"
        );
    }

    #[test]
    fn broken_pem_is_reported_with_the_file_name() {
        let (c, _) = self_signed();
        // Cut the block before its END line.
        let cut = &c[..c.len() / 2];
        let err = certs_from_pem(cut.as_bytes(), Path::new("/tmp/half.pem"), "certificate")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("certificate file /tmp/half.pem is not valid PEM"),
            "{err}"
        );
    }
}
