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
