//! Guards "more than one machine" (Cluster issue, item 9): three nodes, each in its own
//! network namespace with its own address, joined by veth pairs to a bridge in a
//! fourth namespace, each started with `lazarus node --config` as on separate hosts.
//! A volume written through one node's address reads back through another's, from a
//! client in a different namespace. Needs root (`ip netns`); every address lives in
//! the namespaces this test creates and removes.

mod common;
use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The admin API listens on the namespace's address, not loopback: mutating requests
/// need this token.
const TOKEN: &str = "netns-test-token-7f3a";

struct Namespaces {
    prefix: String,
    children: Vec<Child>,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Namespaces {
    fn ns(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    fn hub(&self) -> String {
        format!("{}hub", self.prefix)
    }

    /// Creates `{prefix}hub` with a bridge and `{prefix}1..=3`, each with a veth pair
    /// to the bridge and the address 10.X.0.i/24 (X chosen per run).
    fn create(subnet: u8) -> Namespaces {
        let prefix = format!("lz{:04x}-", fastrand::u16(..));
        let n = Namespaces {
            prefix,
            children: Vec::new(),
        };
        let hub = n.hub();
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for i in 1..=3 {
            let ns = n.ns(i);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let outer = format!("h{i}");
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &outer, "netns",
                &hub,
            ]);
            ip(&["-n", &hub, "link", "set", &outer, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &outer, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.{subnet}.0.{i}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        n
    }

    fn exec(&self, i: usize, cmd: &str, args: &[&str]) -> std::process::Output {
        self.exec_env(i, cmd, args, TOKEN)
    }

    fn exec_env(&self, i: usize, cmd: &str, args: &[&str], token: &str) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(i), cmd])
            .args(args)
            .env("LAZARUS_TOKEN", token)
            .output()
            .unwrap()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 1..=3 {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub()])
            .status();
    }
}

#[test]
fn three_nodes_in_three_network_namespaces() {
    require("ip");
    require("nbdcopy");
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root for `ip netns` (CI and scripts/test.sh run as root)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let subnet = fastrand::u8(100..200);
    let mut n = Namespaces::create(subnet);
    let addr = |i: usize| format!("10.{subnet}.0.{i}");
    // The cluster's credentials, as the README's multi-host example makes them.
    let certs = tmp.path().join("certs");
    let o = Command::new(BIN)
        .args(["certs", "--out"])
        .arg(&certs)
        .args(["n1", "n2", "n3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for i in 1..=3 {
        let dir = tmp.path().join(format!("n{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = format!(
            "id = \"n{i}\"\ndata_dir = \"{}\"\nnbd_listen = \"{}:10809\"\nadmin_listen = \"{}:10819\"\nrpc_listen = \"{}:10829\"\njournal_bytes = 16777216\nadmin_token = \"{TOKEN}\"\ncluster_tls = \"{}\"\n",
            dir.display(),
            addr(i),
            addr(i),
            addr(i),
            certs.join(format!("n{i}")).display()
        );
        for j in (1..=3).filter(|j| *j != i) {
            cfg.push_str(&format!(
                "[[peers]]\nid = \"n{j}\"\nrpc = \"{}:10829\"\n",
                addr(j)
            ));
        }
        let path = dir.join("node.toml");
        std::fs::write(&path, cfg).unwrap();
        let log = std::fs::File::create(dir.join("node.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &n.ns(i), BIN, "node", "--config"])
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        n.children.push(child);
    }
    let api = |i: usize| format!("http://{}:10819", addr(i));
    // Off loopback, a mutating request without the right token is refused and changes
    // nothing (tried until the node answers at all).
    let t0 = Instant::now();
    loop {
        let o = n.exec_env(
            1,
            BIN,
            &[
                "volume",
                "create",
                "nope",
                "--size",
                "64MiB",
                "--api",
                &api(1),
            ],
            "wrong-token",
        );
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        if err.contains("HTTP 401") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30) && !o.status.success(),
            "a wrong token was not refused: {err}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The cluster forms across the namespaces; create a volume through n1's API.
    let t0 = Instant::now();
    loop {
        let o = n.exec(
            1,
            BIN,
            &[
                "volume",
                "create",
                "wide",
                "--size",
                "64MiB",
                "--api",
                &api(1),
            ],
        );
        if o.status.success() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "volume create across namespaces failed: {}{}\nn1 log:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(tmp.path().join("n1/node.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let img = tmp.path().join("in.img");
    let data = random_file(&img, 8 << 20, seed());
    // Written from namespace 2 through n1's address...
    let uri1 = format!("nbd://{}:10809/wide", addr(1));
    let t0 = Instant::now();
    loop {
        let o = n.exec(2, "nbdcopy", &[img.to_str().unwrap(), &uri1]);
        if o.status.success() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nbdcopy into n1: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // ...and read back from namespace 1 through n3's address.
    let out = tmp.path().join("out.img");
    let uri3 = format!("nbd://{}:10809/wide", addr(3));
    let o = n.exec(1, "nbdcopy", &[&uri3, out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = std::fs::read(&out).unwrap();
    assert!(got[..data.len()] == data[..], "read through n3 differs");
    // Reading volume data through the admin API needs the token as changes do.
    let url = format!("{}/api/v1/volumes/wide/data?offset=0&length=4096", api(2));
    for auth in [None, Some("Authorization: Bearer wrong-token")] {
        let mut args = vec!["-s", "-o", "/dev/null", "-w", "%{http_code}", &url];
        if let Some(h) = auth {
            args.extend(["-H", h]);
        }
        let o = n.exec(1, "curl", &args);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "401", "{auth:?}");
    }
    let good = format!("Authorization: Bearer {TOKEN}");
    let o = n.exec(1, "curl", &["-sf", "-H", &good, &url]);
    assert!(
        o.status.success() && o.stdout[..] == data[..4096],
        "a data read with the token failed"
    );
    // Every node holds an identical copy: at once where its copy was live for every
    // write, after its resync where it joined late (a copy created a moment after the
    // first write catches up by Merkle diff).
    let t0 = Instant::now();
    loop {
        let roots: Vec<String> = (1..=3)
            .map(|i| {
                let o = n.exec(
                    i,
                    "curl",
                    &[
                        "-sf",
                        "-H",
                        &good,
                        &format!("{}/api/v1/volumes/wide", api(i)),
                    ],
                );
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
                v["root"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        if roots.iter().all(|r| *r == roots[0] && !r.is_empty()) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "copies differ after 60 s: {roots:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = n.exec(
        1,
        "curl",
        &[
            "-s",
            "-H",
            &good,
            &format!("{}/api/v1/volumes/nope", api(1)),
        ],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("does not exist"));
}
