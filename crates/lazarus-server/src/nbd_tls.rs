//! NBD over TLS: the server side of `NBD_OPT_STARTTLS`, with X.509 certificates and
//! with TLS-PSK, in the file layouts qemu and nbdkit use so one set of credentials
//! serves every client:
//!
//! - X.509: a directory with `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (qemu's
//!   `tls-creds-x509,endpoint=server`); clients use a directory with `ca-cert.pem`,
//!   `client-cert.pem`, `client-key.pem` (qemu's `endpoint=client`, libnbd's
//!   `tls-certificates=DIR`). With `verify_peer` a client must present a certificate
//!   signed by `ca-cert.pem`.
//! - PSK: a file of `username:hexkey` lines (qemu's `tls-creds-psk` `keys.psk`,
//!   nbdkit's `--tls-psk`, libnbd's `tls-psk-file`).
//!
//! OpenSSL does the TLS (the system's libssl): the clients speak GnuTLS, and PSK is
//! something rustls does not offer. `generate` makes both kinds of credentials
//! (`lazarus nbd-certs`, and `lazarus up` for its local cluster).

use lazarus_nbd::TlsPolicy;
use lazarus_node::config::{NbdTlsMode, NodeConfig};
use lazarus_rpc::tls::write_new;
use openssl::ssl::{
    SslAcceptor, SslContextBuilder, SslFiletype, SslMethod, SslVerifyMode, SslVersion,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";
pub const PSK_FILE: &str = "keys.psk";
/// Time a client has for the TLS handshake after the server's STARTTLS acknowledgement.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest PSK identity and key accepted from a key file.
const PSK_IDENTITY_MAX_BYTES: usize = 128;
const PSK_KEY_MAX_BYTES: usize = 256;

/// A node's NBD TLS: what it offers and the context its TLS connections use.
pub struct NbdTls {
    pub policy: TlsPolicy,
    acceptor: SslAcceptor,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NbdTls({:?})", self.policy)
    }
}

/// Reads a PSK file: `username:hexkey` per line, blank lines and `#` comments skipped.
pub fn read_psk_file(path: &Path) -> Result<HashMap<Vec<u8>, Vec<u8>>, String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the PSK file {}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "the PSK file {} may be read by other users (mode {:o}): chmod 600 it",
            path.display(),
            mode & 0o777
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the PSK file {}: {e}", path.display()))?;
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("{} line {}: {why}", path.display(), i + 1);
        let (user, hex) = line
            .split_once(':')
            .ok_or_else(|| bad("expected username:hexkey"))?;
        if user.is_empty() || user.len() > PSK_IDENTITY_MAX_BYTES {
            return Err(bad("the username must be 1 to 128 bytes"));
        }
        let key =
            decode_hex(hex).ok_or_else(|| bad("the key is not an even number of hex digits"))?;
        if key.is_empty() || key.len() > PSK_KEY_MAX_BYTES {
            return Err(bad("the key must be 1 to 256 bytes"));
        }
        keys.insert(user.as_bytes().to_vec(), key);
    }
    if keys.is_empty() {
        return Err(format!("the PSK file {} holds no key", path.display()));
    }
    Ok(keys)
}

/// `bytes` random bytes from the system's CSPRNG, in hex (keys and tokens).
pub fn random_hex(bytes: usize) -> Result<String, String> {
    let mut key = vec![0u8; bytes];
    openssl::rand::rand_bytes(&mut key).map_err(|e| e.to_string())?;
    Ok(key.iter().map(|b| format!("{b:02x}")).collect())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl NbdTls {
    /// The NBD TLS a node's configuration asks for; `None` when it is off.
    pub fn from_config(cfg: &NodeConfig) -> Result<Option<Arc<NbdTls>>, String> {
        let policy = match cfg.nbd_tls {
            NbdTlsMode::Off => return Ok(None),
            NbdTlsMode::On => TlsPolicy::On,
            NbdTlsMode::Require => TlsPolicy::Require,
        };
        NbdTls::load(
            policy,
            cfg.nbd_tls_certificates.as_deref(),
            cfg.nbd_tls_verify_peer,
            cfg.nbd_tls_psk.as_deref(),
        )
        .map(|t| Some(Arc::new(t)))
    }

    pub fn load(
        policy: TlsPolicy,
        certificates: Option<&Path>,
        verify_peer: bool,
        psk: Option<&Path>,
    ) -> Result<NbdTls, String> {
        if certificates.is_none() && psk.is_none() {
            return Err("NBD over TLS needs certificates, a PSK file or both".into());
        }
        let ssl = |e: openssl::error::ErrorStack| format!("OpenSSL: {e}");
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(ssl)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(ssl)?;
        // TLS 1.2: forward-secret suites only, for certificates and for PSK (OpenSSL
        // names the PSK key exchanges kECDHEPSK and kDHEPSK; plain PSK is left out).
        b.set_cipher_list(
            "ECDHE+AESGCM:ECDHE+CHACHA20:kECDHEPSK+CHACHA20:kDHEPSK+AESGCM:kDHEPSK+CHACHA20",
        )
        .map_err(ssl)?;
        // TLS 1.3 with a SHA-256 suite first, chosen by the server: OpenSSL takes an
        // external PSK only with a suite of the PSK's hash (SHA-256), and GnuTLS clients
        // would otherwise pick AES-256-GCM-SHA384, and the PSK would be ignored.
        b.set_ciphersuites(
            "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384",
        )
        .map_err(ssl)?;
        // OpenSSL treats a PSK handshake as a resumption, which needs a session context
        // whenever client certificates are verified.
        b.set_session_id_context(b"lazarus-nbd").map_err(ssl)?;
        // No resumption at all (no tickets, stateless or stateful, and no session
        // cache): every connection proves its certificate or key again, and the node
        // keeps nothing per past connection.
        b.set_options(
            openssl::ssl::SslOptions::NO_TICKET
                | openssl::ssl::SslOptions::CIPHER_SERVER_PREFERENCE,
        );
        b.set_num_tickets(0).map_err(ssl)?;
        b.set_session_cache_mode(openssl::ssl::SslSessionCacheMode::OFF);
        if let Some(dir) = certificates {
            load_certificates(&mut b, dir, verify_peer)?;
        }
        if let Some(path) = psk {
            let keys = read_psk_file(path)?;
            b.set_psk_server_callback(move |_ssl, identity, out| {
                let key = identity.and_then(|id| keys.get(id));
                match key {
                    Some(k) if k.len() <= out.len() => {
                        out[..k.len()].copy_from_slice(k);
                        Ok(k.len())
                    }
                    // An unknown identity: no key, and the handshake fails.
                    _ => Ok(0),
                }
            });
        }
        Ok(NbdTls {
            policy,
            acceptor: b.build(),
        })
    }

    /// The server's TLS handshake on a connection whose client was just told to start
    /// TLS; bounded by `HANDSHAKE_TIMEOUT`.
    pub async fn accept<S>(&self, sock: S) -> std::io::Result<tokio_openssl::SslStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let io = |e: openssl::error::ErrorStack| std::io::Error::other(e.to_string());
        let ssl = openssl::ssl::Ssl::new(self.acceptor.context()).map_err(io)?;
        let mut s = tokio_openssl::SslStream::new(ssl, sock).map_err(io)?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, std::pin::Pin::new(&mut s).accept())
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })?
            .map_err(|e| std::io::Error::other(format!("TLS handshake failed: {e}")))?;
        Ok(s)
    }
}

/// A TLS stream's two halves, each driven by its own task (requests are read by one,
/// replies written by another). `tokio::io::split` alone can stall: OpenSSL may write
/// while reading (the answer to a TLS 1.3 key update) and read while writing, so one
/// task can wait on the readiness of the direction the other task waits on, and the
/// socket keeps one waker per direction — the other task's would be lost. Here the
/// stream is always polled with a waker that wakes both halves' tasks; each retries,
/// and a spurious wake-up costs one poll.
pub fn split<S>(stream: S) -> (TlsRead<S>, TlsWrite<S>) {
    let shared = Arc::new(Shared {
        stream: parking_lot::Mutex::new(stream),
        wakers: Arc::new(BothWakers::default()),
    });
    (TlsRead(shared.clone()), TlsWrite(shared))
}

struct Shared<S> {
    stream: parking_lot::Mutex<S>,
    wakers: Arc<BothWakers>,
}

#[derive(Default)]
struct BothWakers {
    read: parking_lot::Mutex<Option<std::task::Waker>>,
    write: parking_lot::Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for BothWakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        for slot in [&self.read, &self.write] {
            if let Some(w) = slot.lock().take() {
                w.wake();
            }
        }
    }
}

impl<S> Shared<S> {
    /// Polls the stream for one half: that half's task is remembered, and the stream
    /// sees a waker that wakes both.
    fn poll<T>(
        &self,
        cx: &std::task::Context<'_>,
        reader: bool,
        f: impl FnOnce(std::pin::Pin<&mut S>, &mut std::task::Context<'_>) -> T,
    ) -> T
    where
        S: Unpin,
    {
        let slot = if reader {
            &self.wakers.read
        } else {
            &self.wakers.write
        };
        *slot.lock() = Some(cx.waker().clone());
        let waker = std::task::Waker::from(self.wakers.clone());
        let mut both = std::task::Context::from_waker(&waker);
        let mut s = self.stream.lock();
        f(std::pin::Pin::new(&mut *s), &mut both)
    }
}

/// The reading half of `split`.
pub struct TlsRead<S>(Arc<Shared<S>>);
/// The writing half of `split`.
pub struct TlsWrite<S>(Arc<Shared<S>>);

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for TlsRead<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.poll(cx, true, |s, cx| s.poll_read(cx, buf))
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for TlsWrite<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll(cx, false, |s, cx| s.poll_write(cx, buf))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.poll(cx, false, |s, cx| s.poll_flush(cx))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.poll(cx, false, |s, cx| s.poll_shutdown(cx))
    }
}

fn load_certificates(
    b: &mut SslContextBuilder,
    dir: &Path,
    verify_peer: bool,
) -> Result<(), String> {
    let at = |f: &str| dir.join(f);
    for f in [CA_CERT, SERVER_CERT, SERVER_KEY] {
        if !at(f).exists() {
            return Err(format!(
                "{} is missing (an NBD certificate directory holds {CA_CERT}, {SERVER_CERT} and {SERVER_KEY}; `lazarus nbd-certs` makes one)",
                at(f).display()
            ));
        }
    }
    let err = |f: &str| {
        let p = at(f);
        move |e: openssl::error::ErrorStack| format!("{}: {e}", p.display())
    };
    b.set_certificate_chain_file(at(SERVER_CERT))
        .map_err(err(SERVER_CERT))?;
    b.set_private_key_file(at(SERVER_KEY), SslFiletype::PEM)
        .map_err(err(SERVER_KEY))?;
    b.check_private_key().map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            at(SERVER_KEY).display(),
            at(SERVER_CERT).display()
        )
    })?;
    b.set_ca_file(at(CA_CERT)).map_err(err(CA_CERT))?;
    if verify_peer {
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    } else {
        b.set_verify(SslVerifyMode::NONE);
    }
    Ok(())
}

fn leaf_params(
    names: Vec<String>,
    cn: &str,
    eku: rcgen::ExtendedKeyUsagePurpose,
) -> Result<rcgen::CertificateParams, String> {
    let mut p = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    // qemu checks key usage and purpose of both ends' certificates.
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![eku];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// What `generate` made.
#[derive(Debug)]
pub struct Generated {
    /// For the nodes (`nbd_tls_certificates`): ca-cert.pem, server-cert.pem, server-key.pem.
    pub server: PathBuf,
    /// For clients: ca-cert.pem, client-cert.pem, client-key.pem.
    pub client: PathBuf,
    /// `username:hexkey` for both ends (`nbd_tls_psk`; clients' `tls-psk-file`).
    pub psk: PathBuf,
    /// The PSK's username.
    pub psk_user: String,
}

/// Makes NBD TLS credentials under `out` unless they are there already: a CA
/// (`ca-cert.pem`, `ca-key.pem`), `out/server` for the nodes (its certificate names
/// `hosts`, plus localhost, 127.0.0.1 and ::1), `out/client` for clients, and
/// `out/keys.psk` with one random 256-bit key for `psk_user`.
pub fn generate(out: &Path, hosts: &[String], psk_user: &str) -> Result<Generated, String> {
    if psk_user.is_empty()
        || psk_user.len() > PSK_IDENTITY_MAX_BYTES
        || !psk_user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "PSK username {psk_user:?}: use letters, digits, '-', '_' or '.'"
        ));
    }
    let made = Generated {
        server: out.join("server"),
        client: out.join("client"),
        psk: out.join(PSK_FILE),
        psk_user: psk_user.to_string(),
    };
    for d in [out, &made.server, &made.client] {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    if !made.psk.exists() {
        let hex = random_hex(32)?;
        write_new(&made.psk, format!("{psk_user}:{hex}\n").as_bytes(), true)?;
    }
    if made.server.join(SERVER_CERT).exists() && made.client.join(CLIENT_CERT).exists() {
        return Ok(made);
    }
    let ca = lazarus_rpc::tls::ca_params_named("Lazarus NBD CA");
    let ca_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| e.to_string())?;
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let server = leaf_params(
        names,
        "Lazarus NBD server",
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let client = leaf_params(
        vec!["client.lazarus-nbd".into()],
        "Lazarus NBD client",
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let server_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let client_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let server_cert = server
        .signed_by(&server_key, &issuer)
        .map_err(|e| e.to_string())?;
    let client_cert = client
        .signed_by(&client_key, &issuer)
        .map_err(|e| e.to_string())?;
    for (dir, cert, key, cf, kf) in [
        (
            &made.server,
            &server_cert,
            &server_key,
            SERVER_CERT,
            SERVER_KEY,
        ),
        (
            &made.client,
            &client_cert,
            &client_key,
            CLIENT_CERT,
            CLIENT_KEY,
        ),
    ] {
        for f in [CA_CERT, cf, kf] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        write_new(&dir.join(kf), key.serialize_pem().as_bytes(), true)?;
        write_new(&dir.join(cf), cert.pem().as_bytes(), false)?;
        write_new(&dir.join(CA_CERT), ca_cert.pem().as_bytes(), false)?;
    }
    let _ = std::fs::remove_file(out.join("ca-key.pem"));
    write_new(
        &out.join("ca-key.pem"),
        ca_key.serialize_pem().as_bytes(),
        true,
    )?;
    let _ = std::fs::remove_file(out.join(CA_CERT));
    write_new(&out.join(CA_CERT), ca_cert.pem().as_bytes(), false)?;
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_load_and_psk_files_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let g = generate(d.path(), &["nbd.example".into()], "lazarus").unwrap();
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&g.server.join(SERVER_KEY)), 0o600);
        assert_eq!(mode(&g.client.join(CLIENT_KEY)), 0o600);
        assert_eq!(mode(&g.psk), 0o600);
        let keys = read_psk_file(&g.psk).unwrap();
        assert_eq!(keys[b"lazarus".as_slice()].len(), 32);
        NbdTls::load(TlsPolicy::Require, Some(&g.server), true, Some(&g.psk)).unwrap();
        // A second run keeps what is there.
        let psk = std::fs::read(&g.psk).unwrap();
        let cert = std::fs::read(g.server.join(SERVER_CERT)).unwrap();
        generate(d.path(), &[], "lazarus").unwrap();
        assert_eq!(std::fs::read(&g.psk).unwrap(), psk);
        assert_eq!(std::fs::read(g.server.join(SERVER_CERT)).unwrap(), cert);

        let bad = d.path().join("bad.psk");
        std::fs::write(&bad, "alice:00ff\n").unwrap();
        let e = read_psk_file(&bad).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        for (text, why) in [
            ("", "no key"),
            ("alice\n", "username:hexkey"),
            ("alice:abc\n", "hex"),
            ("alice:zz\n", "hex"),
            (":00\n", "username"),
        ] {
            std::fs::write(&bad, text).unwrap();
            let e = read_psk_file(&bad).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        std::fs::write(&bad, "# keys\n\nalice:00ff\n").unwrap();
        assert_eq!(
            read_psk_file(&bad).unwrap()[b"alice".as_slice()],
            vec![0, 255]
        );
        // A certificate directory without its key is named.
        std::fs::remove_file(g.server.join(SERVER_KEY)).unwrap();
        let e = NbdTls::load(TlsPolicy::On, Some(&g.server), true, None).unwrap_err();
        assert!(e.contains(SERVER_KEY), "{e}");
        assert!(NbdTls::load(TlsPolicy::On, None, true, None).is_err());
    }
}
