//! TLS end to end with certificates made at test time: the reloadable acceptor serving
//! HTTP/1.1 and HTTP/2 as ALPN decides, certificate reloads, and the backend client
//! verifying servers against a CA file.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use gateway::forward::{UpstreamClient, UpstreamError};
use gateway::tls::{upstream_tls, TlsError, TlsReloader};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

// === certificates ===

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "gateway-tls-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private CA and the server certificates it issues, as files in a temp dir.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    dir: TempDir,
}

/// A server certificate and its key.
struct Issued {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gateway test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        let dir = TempDir::new();
        std::fs::write(dir.0.join("ca.pem"), ca.pem()).unwrap();
        Pki { ca, ca_key, dir }
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.0.join("ca.pem")
    }

    fn cert_path(&self) -> PathBuf {
        self.dir.0.join("server.crt")
    }

    fn key_path(&self) -> PathBuf {
        self.dir.0.join("server.key")
    }

    /// A server certificate for `localhost` and `127.0.0.1`, told apart by `cn`.
    fn issue(&self, cn: &str) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// Write `issued` as the server's certificate and key files.
    fn install(&self, issued: &Issued) {
        std::fs::write(self.cert_path(), &issued.cert_pem).unwrap();
        std::fs::write(self.key_path(), &issued.key_pem).unwrap();
    }
}

// === servers and clients ===

/// A tiny HTTPS app on the acceptor under test: it answers with the HTTP version it saw.
struct TlsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn version_echo(
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> {
    let body = Full::new(Bytes::from(format!("{:?}", req.version())));
    async move { Ok(Response::new(body)) }
}

fn serve_tls(listener: TcpListener, tls: Arc<TlsReloader>) -> TlsServer {
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            // Taken per connection, as the gateway does, so reloads reach new connections.
            let acceptor = tls.acceptor();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(version_echo))
                    .await;
            });
        }
    });
    TlsServer { addr, task }
}

async fn start(pki: &Pki) -> (Arc<TlsReloader>, TlsServer) {
    let tls = Arc::new(TlsReloader::load(&pki.cert_path(), &pki.key_path()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve_tls(listener, tls.clone());
    (tls, server)
}

/// A TLS client connection that trusts only `ca` and offers `alpn`.
async fn connect(addr: SocketAddr, ca: &Path, alpn: &[&[u8]]) -> Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost")?;
    Ok(TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?)
}

fn peer_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// One GET over an HTTP/1.1 connection on `stream`; returns the version and body.
async fn get_http1(stream: TlsStream<TcpStream>) -> Result<(Version, String)> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("/")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())?,
        )
        .await?;
    let version = resp.version();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((version, String::from_utf8(body.to_vec())?))
}

/// The gateway's backend client, trusting `ca` (or the system roots).
fn backend_client(ca: Option<&Path>) -> UpstreamClient {
    UpstreamClient::new(
        upstream_tls(ca).unwrap(),
        Duration::from_secs(5),
        Duration::from_secs(4),
    )
}

fn get(uri: &str) -> Request<Bytes> {
    Request::get(uri).body(Bytes::new()).unwrap()
}

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("test step took longer than 20 s")
}

// === tests ===

#[tokio::test]
async fn https_backends_are_trusted_by_the_ca_file_and_spoken_to_in_http1() {
    let pki = Pki::new();
    pki.install(&pki.issue("server-a"));
    let (_tls, server) = start(&pki).await;
    let client = backend_client(Some(&pki.ca_path()));
    for host in ["127.0.0.1", "localhost"] {
        let uri = format!("https://{host}:{}/v1/models", server.addr.port());
        let resp = bounded(client.request(get(&uri)))
            .await
            .with_context(|| uri.clone())
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), Version::HTTP_11);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"HTTP/1.1", "the server saw another version");
    }
}

#[tokio::test]
async fn alpn_chooses_http2_or_http1_per_connection() {
    let pki = Pki::new();
    pki.install(&pki.issue("server-a"));
    let (_tls, server) = start(&pki).await;

    let h2 = bounded(connect(server.addr, &pki.ca_path(), &[b"h2", b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://localhost/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = bounded(send.send_request(req)).await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"HTTP/2.0");

    let h1 = bounded(connect(server.addr, &pki.ca_path(), &[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (version, body) = bounded(get_http1(h1)).await.unwrap();
    assert_eq!((version, body.as_str()), (Version::HTTP_11, "HTTP/1.1"));
}

#[tokio::test]
async fn reload_reaches_new_connections_only_and_a_broken_file_keeps_the_old_certificate() {
    let pki = Pki::new();
    let a = pki.issue("server-a");
    pki.install(&a);
    let (tls, server) = start(&pki).await;
    let ca = pki.ca_path();

    // A keep-alive connection opened before the reload.
    let old = bounded(connect(server.addr, &ca, &[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(peer_cert(&old), a.der);
    let (mut old_send, old_conn) = hyper::client::conn::http1::handshake(TokioIo::new(old))
        .await
        .unwrap();
    tokio::spawn(old_conn);

    let b = pki.issue("server-b");
    assert_ne!(a.der, b.der);
    pki.install(&b);
    tls.reload().unwrap();
    let new = bounded(connect(server.addr, &ca, &[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(
        peer_cert(&new),
        b.der,
        "a new connection still sees the old certificate"
    );
    assert_eq!(bounded(get_http1(new)).await.unwrap().1, "HTTP/1.1");

    // The connection from before the reload carries on untouched.
    let req = Request::get("/")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = bounded(old_send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);

    // A truncated certificate file: refused, naming the file; B stays in force.
    std::fs::write(pki.cert_path(), &b.cert_pem[..b.cert_pem.len() / 2]).unwrap();
    let err = tls.reload().unwrap_err();
    assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&pki.cert_path().display().to_string()),
        "{err}"
    );
    // A certificate whose key was not rewritten with it: refused, naming both files.
    pki.install(&b);
    std::fs::write(pki.cert_path(), pki.issue("server-c").cert_pem).unwrap();
    let err = tls.reload().unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    let stream = bounded(connect(server.addr, &ca, &[b"h2"])).await.unwrap();
    assert_eq!(
        peer_cert(&stream),
        b.der,
        "a failed reload replaced the certificate"
    );
}

#[tokio::test]
async fn reload_from_switches_to_other_files_only_when_they_load() {
    let pki = Pki::new();
    let a = pki.issue("server-a");
    pki.install(&a);
    let (tls, server) = start(&pki).await;

    let b = pki.issue("server-b");
    let (cert_b, key_b) = (pki.dir.0.join("b.crt"), pki.dir.0.join("b.key"));
    std::fs::write(&cert_b, &b.cert_pem).unwrap();
    std::fs::write(&key_b, &b.key_pem).unwrap();

    let missing = pki.dir.0.join("missing.key");
    let err = tls.reload_from(&cert_b, &missing).unwrap_err();
    assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
    assert_eq!(tls.key_path(), pki.key_path());

    tls.reload_from(&cert_b, &key_b).unwrap();
    assert_eq!((tls.cert_path(), tls.key_path()), (cert_b, key_b));
    let stream = bounded(connect(server.addr, &pki.ca_path(), &[b"h2"]))
        .await
        .unwrap();
    assert_eq!(peer_cert(&stream), b.der);
}

#[tokio::test]
async fn servers_outside_the_trusted_roots_are_rejected() {
    let pki = Pki::new();
    pki.install(&pki.issue("server-a"));
    let (_tls, server) = start(&pki).await;
    let uri: http::Uri = format!("https://127.0.0.1:{}/", server.addr.port())
        .parse()
        .unwrap();

    let other = Pki::new();
    for (label, client) in [
        ("system roots", backend_client(None)),
        ("another CA", backend_client(Some(&other.ca_path()))),
    ] {
        let err = bounded(client.request(get(&uri.to_string())))
            .await
            .expect_err(label);
        assert!(matches!(err, UpstreamError::Connect(_)), "{label}: {err:?}");
        // UnknownIssuer for the system roots; BadSignature for the other CA, whose name
        // matches ours but whose key does not.
        assert!(
            format!("{err:?}").contains("InvalidCertificate"),
            "{label}: not a certificate failure: {err:?}"
        );
    }
}

#[tokio::test]
async fn the_backend_client_still_reaches_plain_http_backends() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), service_fn(version_echo))
            .await;
    });
    let pki = Pki::new();
    let client = backend_client(Some(&pki.ca_path()));
    let resp = bounded(client.request(get(&format!("http://{addr}/"))))
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"HTTP/1.1");
    task.abort();
}

#[test]
fn load_errors_name_the_file_and_the_problem() {
    let pki = Pki::new();
    let a = pki.issue("server-a");
    let dir = &pki.dir.0;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cert = write("a.crt", &a.cert_pem);
    let key = write("a.key", &a.key_pem);
    let other_key = write("other.key", &pki.issue("server-b").key_pem);
    let empty = write("empty.pem", "");
    let missing = dir.join("nope.crt");
    assert!(TlsReloader::load(&cert, &key).is_ok());

    let cases: [(&Path, &Path, &[&str]); 5] = [
        (
            &missing,
            &key,
            &["cannot read certificate file", "nope.crt"],
        ),
        (&key, &key, &["holds no certificate", "a.key"]),
        (&empty, &key, &["holds no certificate", "empty.pem"]),
        (&cert, &cert, &["holds no private key", "a.crt"]),
        (&cert, &other_key, &["does not match", "a.crt", "other.key"]),
    ];
    for (c, k, needles) in cases {
        let err = TlsReloader::load(c, k).unwrap_err().to_string();
        for needle in needles {
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
        }
    }

    let err = upstream_tls(Some(&missing)).err().unwrap().to_string();
    assert!(
        err.contains("cannot read CA file") && err.contains("nope.crt"),
        "{err}"
    );
    let err = upstream_tls(Some(&key)).err().unwrap().to_string();
    assert!(err.contains("CA file") && err.contains("a.key"), "{err}");
}
