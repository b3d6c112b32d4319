//! Strangers on the cluster's ports (issue 14): the nodes' RPC ports and the recovery
//! server's serve members of the cluster only (mutual TLS with the cluster's CA, made
//! by `lazarus up`); a peer with no TLS, with TLS and no certificate, or with a
//! certificate of another cluster gets no reply and changes nothing.

mod common;
use common::*;
use std::time::Duration;

fn py(script: &str) -> String {
    format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"))
}

/// What `stranger.py` saw: "reply STATUS" or "refused: ...".
fn stranger(port: u16, mode: &str, kind: u8, body: &str) -> String {
    run(
        "python3",
        &[
            &py("stranger.py"),
            "127.0.0.1",
            &port.to_string(),
            mode,
            &kind.to_string(),
            body,
        ],
    )
    .trim()
    .to_string()
}

/// The RPC request kinds used here (`lazarus_rpc::kind`).
const KIND_CLIENT_WRITE: u8 = 4;
const KIND_RS_STATE: u8 = 43;

#[test]
fn cluster_ports_serve_members_of_the_cluster_only() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cluster");
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(60));
    up.cli_ok(&["volume", "create", "scratch", "--size", "16MiB"]);
    // Another cluster's credentials, made the way an operator makes them.
    let other = tmp.path().join("other");
    run(BIN, &["certs", "--out", other.to_str().unwrap(), "n1"]);
    let other_member = format!("tls:{}", other.join("n1").display());
    let delete = |vol: &str| format!(r#"{{"DeleteVolume":{{"name":"{vol}"}}}}"#);
    let rpc_ports: Vec<u16> = (0..3).map(|i| up.base + 20 + i).collect();
    let rs_port = up.base + 30;
    for port in rpc_ports.iter().copied().chain([rs_port]) {
        for mode in ["plain", "tls-anonymous", &other_member] {
            let kind = if port == rs_port {
                KIND_RS_STATE
            } else {
                KIND_CLIENT_WRITE
            };
            let body = if port == rs_port {
                r#"{"volume":"vol0"}"#.to_string()
            } else {
                delete("vol0")
            };
            let got = stranger(port, mode, kind, &body);
            assert!(
                got.starts_with("refused"),
                "port {port}, {mode}: a stranger was answered: {got}"
            );
        }
    }
    // The same frame from a member of this cluster is served (so the strangers' frames
    // were ones the port would act on): it deletes the scratch volume.
    let member = format!("tls:{}", data.join("certs").join("n2").display());
    // (Only the Raft leader applies it; the others answer that they are not.)
    for port in &rpc_ports {
        let got = stranger(*port, &member, KIND_CLIENT_WRITE, &delete("scratch"));
        assert_eq!(got, "reply 0", "a member's metadata command was not served");
    }
    let got = stranger(rs_port, &member, KIND_RS_STATE, r#"{"volume":"vol0"}"#);
    assert!(
        got.starts_with("reply"),
        "the recovery server refused a member: {got}"
    );
    let t0 = std::time::Instant::now();
    while up.volume_meta(1, "scratch").is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the member's delete never applied"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // vol0 is untouched and every copy still live; the cluster still serves.
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let f = tmp.path().join("f");
    let want = random_file(&f, 1 << 20, 14);
    run("nbdcopy", &[f.to_str().unwrap(), &up.uri(2, "vol0")]);
    let back = tmp.path().join("back");
    run("nbdcopy", &[&up.uri(3, "vol0"), back.to_str().unwrap()]);
    assert_eq!(&std::fs::read(&back).unwrap()[..want.len()], &want[..]);
}

/// `lazarus up` makes an admin token only its user can read, and every admin request
/// but the liveness probe and the dashboard's empty page needs it: reads (status,
/// metrics, volume data) as well as changes. Another local user (`nobody`) can read
/// neither the token, nor the NBD credentials, nor the data directory; gets 401 from
/// the admin API and no export from NBD (TLS required, the default). The CLI run by
/// the cluster's user finds the token by itself.
#[test]
fn another_local_user_can_neither_read_nor_change_anything() {
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root to act as another user (CI and scripts/test.sh run as root)");
    }
    for t in ["curl", "runuser", "nbdinfo"] {
        require(t);
    }
    let tmp = tempfile::tempdir().unwrap();
    // Others may enter the test's directory, so only `up`'s own modes keep them out.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let data = tmp.path().join("cluster");
    let up = Up::start_with(&data, "16MiB", &["--nbd-tls", "require"]);
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&data.join("admin.token")), 0o600);
    assert_eq!(mode(&data), 0o700);
    let token = up.token();
    assert!(token.len() >= 32, "a short token: {token:?}");

    let code = |user: Option<&str>, method: &str, path: &str, auth: Option<&str>| -> String {
        let url = format!("{}{path}", up.admin(1));
        let mut args: Vec<String> = Vec::new();
        if let Some(u) = user {
            args.extend(["-u".into(), u.into(), "--".into(), "curl".into()]);
        }
        args.extend(
            [
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "10",
                "-X",
                method,
            ]
            .map(String::from),
        );
        if let Some(a) = auth {
            args.extend(["-H".into(), format!("Authorization: Bearer {a}")]);
        }
        args.push(url);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let prog = if user.is_some() { "runuser" } else { "curl" };
        String::from_utf8_lossy(&run_out(prog, &argv).stdout).into_owned()
    };
    // One byte different, and the token with a byte more: both wrong.
    let mut near = token.clone().into_bytes();
    near[0] = if near[0] == b'a' { b'b' } else { b'a' };
    let near = String::from_utf8(near).unwrap();
    let longer = format!("{token}0");
    for (method, path) in [
        ("GET", "/api/v1/status"),
        ("GET", "/api/v1/cluster"),
        ("GET", "/api/v1/volumes"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/dashboard"),
        ("GET", "/api/v1/volumes/vol0/data?offset=0&length=4096"),
        ("DELETE", "/api/v1/volumes/vol0"),
        ("POST", "/api/v1/faults/heal"),
    ] {
        for auth in [None, Some(near.as_str()), Some(longer.as_str())] {
            assert_eq!(
                code(None, method, path, auth),
                "401",
                "{method} {path} {auth:?}"
            );
        }
        assert_eq!(
            code(Some("nobody"), method, path, None),
            "401",
            "nobody: {method} {path}"
        );
    }
    // What needs no token carries no data.
    assert_eq!(code(None, "GET", "/api/v1/health", None), "200");
    assert_eq!(code(None, "GET", "/", None), "200");
    assert_eq!(code(None, "GET", "/api/v1/status", Some(&token)), "200");
    // Nobody can read the token, the NBD credentials or the volumes' files.
    for path in [
        data.join("admin.token"),
        data.join("nbd-tls").join("client").join("client-key.pem"),
        data.join("nbd-tls").join("keys.psk"),
    ] {
        let o = run_out(
            "runuser",
            &["-u", "nobody", "--", "cat", path.to_str().unwrap()],
        );
        assert!(!o.status.success(), "nobody read {}", path.display());
    }
    let o = run_out(
        "runuser",
        &[
            "-u",
            "nobody",
            "--",
            "ls",
            data.join("n1").to_str().unwrap(),
        ],
    );
    assert!(!o.status.success(), "nobody listed n1's files");
    // NBD: in the clear, refused; with TLS, nobody has no credential to use.
    for uri in [
        format!("nbd://127.0.0.1:{}/vol0", up.base),
        format!(
            "nbds://127.0.0.1:{}/vol0?tls-certificates={}",
            up.base,
            data.join("nbd-tls").join("client").display()
        ),
    ] {
        let o = run_out("runuser", &["-u", "nobody", "--", "nbdinfo", &uri]);
        assert!(!o.status.success(), "nobody reached {uri}");
    }
    // The cluster's own user: the CLI finds the token; a wrong one is named.
    let list = up.cli_ok(&["volume", "list"]);
    assert!(list.contains("vol0"), "{list}");
    let o = std::process::Command::new(BIN)
        .args(["volume", "list", "--data", data.to_str().unwrap()])
        .env("LAZARUS_TOKEN", &near)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("wrong token"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
