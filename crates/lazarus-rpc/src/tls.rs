//! Cluster credentials: mutual TLS on every RPC connection (node to node, node to
//! recovery server), with certificates from the cluster's own certificate authority.
//!
//! A member's credential directory holds `ca.crt` (the cluster's CA certificate),
//! `node.crt` (the member's certificate, signed by that CA) and `node.key` (its private
//! key, readable by its owner only). Both ends of a connection present their
//! certificate and check the other's against the cluster CA: a peer without a
//! certificate of this cluster (a stranger, a node of another cluster) fails the
//! handshake and gets no frame read at all. `generate` makes the CA and the members'
//! directories (`lazarus certs`, and `lazarus up` for its local cluster).
//!
//! Every member certificate names `MEMBER_NAME`; a caller verifies that name, whatever
//! address it dialed, so nodes may move between addresses without new certificates.
//! Any member may act as any other (as etcd's peer certificates without a CN filter);
//! SECURITY.md says so.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The cluster CA's certificate in a credential directory.
pub const CA_CERT: &str = "ca.crt";
/// The member's certificate and key in a credential directory.
pub const MEMBER_CERT: &str = "node.crt";
pub const MEMBER_KEY: &str = "node.key";
/// The CA's private key, kept only in the directory `generate` writes to (beside the
/// members' directories), never in a member's.
pub const CA_KEY: &str = "ca.key";
/// The DNS name every member certificate carries and every caller verifies.
pub const MEMBER_NAME: &str = "member.lazarus-cluster";
/// Time a peer has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A member's cluster credentials, ready for both ends of a connection.
pub struct Credentials {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    pub(crate) connector: tokio_rustls::TlsConnector,
    pub(crate) name: ServerName<'static>,
    /// Where they were loaded from (for messages).
    pub dir: PathBuf,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({})", self.dir.display())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

impl Credentials {
    /// Loads a member's credential directory (`ca.crt`, `node.crt`, `node.key`).
    pub fn load(dir: &Path) -> Result<Arc<Credentials>, String> {
        let ca = read_certs(&dir.join(CA_CERT))?;
        let chain = read_certs(&dir.join(MEMBER_CERT))?;
        let key_path = dir.join(MEMBER_KEY);
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| format!("cannot read the private key {}: {e}", key_path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| {
                format!(
                    "{}: not a usable CA certificate: {e}",
                    dir.join(CA_CERT).display()
                )
            })?;
        }
        let roots = Arc::new(roots);
        let tls13 = &[&rustls::version::TLS13];
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("cluster CA in {}: {e}", dir.display()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("{}: {e}", dir.join(MEMBER_CERT).display()))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("{}: {e}", dir.join(MEMBER_CERT).display()))?;
        Ok(Arc::new(Credentials {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            name: ServerName::try_from(MEMBER_NAME).expect("a valid DNS name"),
            dir: dir.to_path_buf(),
        }))
    }
}

/// The cluster CA's parameters: the same every time, so a CA key read back from disk
/// signs new members' certificates that chain to the CA certificate made with it.
fn ca_params() -> rcgen::CertificateParams {
    ca_params_named("Lazarus cluster CA")
}

/// A certificate authority's parameters with this common name (the NBD CA's too).
pub fn ca_params_named(name: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Writes `contents` to `path`, readable by its owner only when `private`; never over
/// an existing file.
pub fn write_new(path: &Path, contents: impl AsRef<[u8]>, private: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(contents.as_ref())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Whether `name` may name a member's directory: letters, digits, `-`, `_`.
fn member_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Makes cluster credentials under `out`: the CA (`ca.crt`, `ca.key`; made once, reused
/// when already there) and, for each member without one yet, a directory `out/NAME`
/// with `ca.crt`, `node.crt` and `node.key`. Returns the member directories it created.
pub fn generate(out: &Path, members: &[String]) -> Result<Vec<PathBuf>, String> {
    for m in members {
        if !member_name_ok(m) {
            return Err(format!(
                "member name {m:?}: use 1 to 64 letters, digits, '-' or '_'"
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let (ca_cert, ca_key_path) = (out.join(CA_CERT), out.join(CA_KEY));
    let ca_key = if ca_key_path.exists() {
        let pem = std::fs::read_to_string(&ca_key_path)
            .map_err(|e| format!("cannot read {}: {e}", ca_key_path.display()))?;
        rcgen::KeyPair::from_pem(&pem)
            .map_err(|e| format!("{} is not a private key: {e}", ca_key_path.display()))?
    } else {
        if ca_cert.exists() {
            return Err(format!(
                "{} exists without its key {}: move it away or restore the key",
                ca_cert.display(),
                ca_key_path.display()
            ));
        }
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = ca_params().self_signed(&key).map_err(|e| e.to_string())?;
        write_new(&ca_key_path, key.serialize_pem(), true)?;
        write_new(&ca_cert, cert.pem(), false)?;
        key
    };
    let ca_pem = std::fs::read_to_string(&ca_cert)
        .map_err(|e| format!("cannot read {}: {e}", ca_cert.display()))?;
    let issuer = rcgen::Issuer::new(ca_params(), ca_key);
    let mut made = Vec::new();
    for m in members {
        let dir = out.join(m);
        if dir.join(MEMBER_CERT).exists() && dir.join(MEMBER_KEY).exists() {
            continue;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        for f in [CA_CERT, MEMBER_CERT, MEMBER_KEY] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let mut p = rcgen::CertificateParams::new(vec![MEMBER_NAME.to_string()])
            .map_err(|e| e.to_string())?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, m.as_str());
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = p.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        write_new(&dir.join(MEMBER_KEY), key.serialize_pem(), true)?;
        write_new(&dir.join(MEMBER_CERT), cert.pem(), false)?;
        write_new(&dir.join(CA_CERT), &ca_pem, false)?;
        made.push(dir);
    }
    Ok(made)
}

/// A connection after its handshake: plain, or TLS as server or client.
pub type BoxRead = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// Either side's handshake, bounded by `HANDSHAKE_TIMEOUT`, split into halves.
async fn handshake<S>(
    h: impl std::future::Future<Output = std::io::Result<S>>,
) -> std::io::Result<(BoxRead, BoxWrite)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, h)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
        })??;
    let (r, w) = tokio::io::split(s);
    Ok((Box::new(r), Box::new(w)))
}

fn plain(sock: crate::net::Stream) -> (BoxRead, BoxWrite) {
    let (r, w) = sock.into_split();
    (Box::new(r), Box::new(w))
}

/// Bytes read from the socket at a time under TLS. rustls asks its transport for 4 KiB
/// at a time; without a buffer below it every 4 KiB of a burst of updates would be its
/// own system call.
const TLS_READ_BUFFER_BYTES: usize = 256 << 10;

/// The socket with a read buffer under the TLS layer (writes pass through).
fn buffered(sock: crate::net::Stream) -> tokio::io::BufReader<crate::net::Stream> {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER_BYTES, sock)
}

/// The server side's handshake on an accepted connection (none without credentials).
pub(crate) async fn accept(
    sock: crate::net::Stream,
    tls: Option<&Arc<Credentials>>,
) -> std::io::Result<(BoxRead, BoxWrite)> {
    match tls {
        Some(tls) => handshake(tls.acceptor.accept(buffered(sock))).await,
        None => Ok(plain(sock)),
    }
}

/// The client side's handshake on a new connection (none without credentials): the
/// raw halves under the RPC framing, for a caller that writes frames itself (the
/// hostile-member tests).
pub async fn connect(
    sock: crate::net::Stream,
    tls: Option<&Arc<Credentials>>,
) -> std::io::Result<(BoxRead, BoxWrite)> {
    match tls {
        Some(tls) => handshake(tls.connector.connect(tls.name.clone(), buffered(sock))).await,
        None => Ok(plain(sock)),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_makes_loadable_members_and_reuses_its_ca() {
        let d = tempfile::tempdir().unwrap();
        let made = generate(d.path(), &["n1".into(), "rs".into()]).unwrap();
        assert_eq!(made.len(), 2);
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&d.path().join("n1").join(MEMBER_KEY)), 0o600);
        assert_eq!(mode(&d.path().join(CA_KEY)), 0o600);
        assert!(!d.path().join("n1").join(CA_KEY).exists());
        Credentials::load(&d.path().join("n1")).unwrap();
        // A second run adds a member with the same CA and leaves the others alone.
        let ca = std::fs::read(d.path().join(CA_CERT)).unwrap();
        let n1 = std::fs::read(d.path().join("n1").join(MEMBER_CERT)).unwrap();
        let made = generate(d.path(), &["n1".into(), "n4".into()]).unwrap();
        assert_eq!(made, vec![d.path().join("n4")]);
        assert_eq!(std::fs::read(d.path().join(CA_CERT)).unwrap(), ca);
        assert_eq!(
            std::fs::read(d.path().join("n1").join(MEMBER_CERT)).unwrap(),
            n1
        );
        Credentials::load(&d.path().join("n4")).unwrap();
        assert!(generate(d.path(), &["../x".into()]).is_err());
    }

    #[test]
    fn load_names_what_is_missing_or_broken() {
        let d = tempfile::tempdir().unwrap();
        let e = Credentials::load(d.path()).unwrap_err();
        assert!(e.contains("ca.crt"), "{e}");
        generate(d.path(), &["n1".into()]).unwrap();
        std::fs::write(d.path().join("n1").join(MEMBER_KEY), "not a key").unwrap();
        let e = Credentials::load(&d.path().join("n1")).unwrap_err();
        assert!(e.contains("node.key"), "{e}");
    }
}
