//! NBD over TLS (issue 14): `NBD_OPT_STARTTLS` with X.509 certificates and with TLS-PSK,
//! against real clients (qemu-img and qemu-io with `tls-creds-x509` / `tls-creds-psk`
//! objects, nbdcopy and nbdinfo with `nbds://` URIs); where TLS is required a client in
//! the clear, a client with the wrong PSK, and clients with no or a stranger's
//! certificate get nothing, and the volume keeps its bytes.

mod common;
use common::*;
use std::path::Path;
use std::process::Output;

fn py(script: &str) -> String {
    format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"))
}

fn x509_uri(port: u16, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/vol0?tls-certificates={}",
        dir.display()
    )
}

fn psk_uri(port: u16, user: &str, file: &Path) -> String {
    format!(
        "nbds://{user}@127.0.0.1:{port}/vol0?tls-psk-file={}",
        file.display()
    )
}

fn refused(o: &Output, what: &str) -> String {
    assert!(
        !o.status.success(),
        "{what}: served, stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The first `len` bytes of vol0 through nbdcopy at `uri`.
fn read_back(uri: &str, tmp: &Path, len: usize) -> Vec<u8> {
    let out = tmp.join(format!("back-{}.img", fastrand::u64(..)));
    run("nbdcopy", &[uri, out.to_str().unwrap()]);
    let mut b = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    b.truncate(len);
    b
}

#[test]
fn tls_required_serves_x509_and_psk_clients_and_refuses_everyone_else() {
    for t in ["qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "python3"] {
        require(t);
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cluster");
    let up = Up::start_with(&data, "64MiB", &["--nbd-tls", "require"]);
    let tls = data.join("nbd-tls");
    let (client, psk) = (tls.join("client"), tls.join("keys.psk"));
    let port = |n: u16| up.base + n - 1;

    // X.509 with qemu-img (its tls-creds-x509 object) into n1.
    let seed = seed();
    let src = tmp.path().join("src.img");
    let written = random_file(&src, 4 << 20, seed);
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                client.display()
            ),
            "-f",
            "raw",
            "--target-image-opts",
            src.to_str().unwrap(),
            &format!(
                "driver=nbd,host=127.0.0.1,port={},export=vol0,tls-creds=tls0",
                port(1)
            ),
        ],
    );
    // PSK with nbdcopy from n2 (which forwards to the primary): the same bytes.
    let back = read_back(&psk_uri(port(2), "lazarus", &psk), tmp.path(), 4 << 20);
    assert!(
        back == written,
        "seed {seed}: bytes read back over PSK differ"
    );
    // PSK with qemu-io (tls-creds-psk reads DIR/keys.psk) on n3, at an odd offset.
    let qio = run(
        "qemu-io",
        &[
            "--object",
            &format!(
                "tls-creds-psk,id=tls0,endpoint=client,dir={},username=lazarus",
                tls.display()
            ),
            "--image-opts",
            &format!(
                "driver=nbd,host=127.0.0.1,port={},export=vol0,tls-creds=tls0",
                port(3)
            ),
            "-c",
            "write -P 0x5a 40000512 70000",
            "-c",
            "read -P 0x5a 40000512 70000",
        ],
    );
    assert!(!qio.contains("Pattern verification failed"), "{qio}");
    let info = run("nbdinfo", &[&x509_uri(port(1), &client)]);
    assert!(info.contains("with TLS"), "{info}");

    // Everyone else gets nothing.
    let plain = format!("nbd://127.0.0.1:{}/vol0", port(1));
    let e = refused(&run_out("nbdinfo", &[&plain]), "nbdinfo in the clear");
    assert!(e.contains("opt_go") || e.contains("TLS"), "{e}");
    let e = refused(
        &run_out("qemu-img", &["info", &plain]),
        "qemu-img in the clear",
    );
    assert!(e.contains("TLS negotiation required"), "{e}");
    let wrong = tmp.path().join("wrong.psk");
    std::fs::write(&wrong, format!("lazarus:{}\n", "ab".repeat(32))).unwrap();
    refused(
        &run_out("nbdinfo", &[&psk_uri(port(1), "lazarus", &wrong)]),
        "a wrong PSK",
    );
    refused(
        &run_out("nbdinfo", &[&psk_uri(port(1), "mallory", &psk)]),
        "an unknown PSK username",
    );
    // A client that trusts the server but holds another CA's certificate, and one with
    // no certificate at all.
    let other = tmp.path().join("other");
    run(BIN, &["nbd-certs", "--out", other.to_str().unwrap()]);
    let (mixed, bare) = (tmp.path().join("mixed"), tmp.path().join("bare"));
    for d in [&mixed, &bare] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(client.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
    }
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join("client").join(f), mixed.join(f)).unwrap();
    }
    refused(
        &run_out("nbdinfo", &[&x509_uri(port(1), &mixed)]),
        "another CA's client certificate",
    );
    refused(
        &run_out("nbdinfo", &[&x509_uri(port(1), &bare)]),
        "no client certificate",
    );
    // In the clear, option by option: TLS required for each (0x80000005), and the
    // export name, which cannot be refused, closes the connection with no byte sent.
    let seen = run(
        "python3",
        &[
            &py("nbd_clear.py"),
            "127.0.0.1",
            &port(1).to_string(),
            "vol0",
        ],
    );
    assert_eq!(
        seen.trim(),
        "list 0x80000005\ninfo 0x80000005\ngo 0x80000005\nstructured 0x80000005\nclosed",
        "{seen}"
    );
    // Nothing changed and every node still serves.
    for n in 1..=3 {
        let back = read_back(&x509_uri(port(n), &client), tmp.path(), 4 << 20);
        assert!(back == written, "seed {seed}: n{n} serves other bytes");
    }
    let log = up.node_log(1);
    assert!(log.contains("TLS handshake failed"), "n1 logged no refusal");
}

/// `lazarus up`'s default offers TLS: clients in the clear and clients with TLS are
/// both served, and see the same bytes.
#[test]
fn tls_offered_serves_clients_with_and_without_it() {
    for t in ["nbdcopy", "nbdinfo", "qemu-io"] {
        require(t);
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cluster");
    let up = Up::start(&data, "16MiB");
    let tls = data.join("nbd-tls");
    let plain = up.uri(1, "vol0");
    run(
        "qemu-io",
        &["-f", "raw", &plain, "-c", "write -P 0x42 1048576 65536"],
    );
    let info = run("nbdinfo", &[&plain]);
    assert!(info.contains("without TLS"), "{info}");
    let x509 = x509_uri(up.base, &tls.join("client"));
    let info = run("nbdinfo", &[&x509]);
    assert!(info.contains("with TLS"), "{info}");
    let a = read_back(&plain, tmp.path(), 16 << 20);
    let b = read_back(&x509, tmp.path(), 16 << 20);
    let c = read_back(
        &psk_uri(up.base + 1, "lazarus", &tls.join("keys.psk")),
        tmp.path(),
        16 << 20,
    );
    assert!(a == b && b == c, "clear, X.509 and PSK reads differ");
    assert!(a[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0x42));
}

/// A node whose configuration asks for TLS without credentials, or names broken ones,
/// does not start, and says why.
#[test]
fn a_node_with_broken_nbd_tls_settings_says_why_and_does_not_start() {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("creds");
    run(BIN, &["nbd-certs", "--out", creds.to_str().unwrap()]);
    std::fs::write(creds.join("server").join("server-key.pem"), "not a key").unwrap();
    std::fs::write(tmp.path().join("bad.psk"), "lazarus:xyz\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let private = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(tmp.path().join("bad.psk"), private).unwrap();
    }
    for (extra, expect) in [
        ("nbd_tls = \"require\"\n", "needs nbd_tls_certificates"),
        ("nbd_tls = \"sometimes\"\n", "unknown variant `sometimes`"),
        (
            "nbd_tls = \"on\"\nnbd_tls_certificates = \"creds/server\"\n",
            "server-key.pem",
        ),
        (
            "nbd_tls = \"on\"\nnbd_tls_psk = \"bad.psk\"\n",
            "bad.psk line 1",
        ),
    ] {
        let dir = tmp.path().join(format!("n{}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let config = tmp.path().join(format!("{}.toml", fastrand::u32(..)));
        std::fs::write(
            &config,
            format!(
                "id = \"t1\"\ndata_dir = \"{}\"\nnbd_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}",
                dir.display()
            ),
        )
        .unwrap();
        let o = run_out(
            "timeout",
            &["30", BIN, "node", "--config", config.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra}: started");
        assert!(err.contains(expect), "{extra}: {err}");
    }
}
