//! Guards the admin API's contract (Operability issue): every route answers JSON,
//! bad requests get a clear JSON error with a fitting status and change nothing, the
//! OpenAPI description lists the routes, and `/metrics` parses as Prometheus text with
//! values that move when I/O happens.

mod common;
use common::*;
use serde_json::Value;
use std::process::Command;

fn http(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let mut args = vec!["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method];
    if let Some(b) = body {
        args.extend(["-H", "content-type: application/json", "-d", b]);
    }
    args.push(url);
    let o = Command::new("curl").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {body}"))
        .to_string()
}

#[test]
fn contract_bad_requests_and_openapi() {
    require("curl");
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(tmp.path(), NodeOpts::default());
    let base = node.api_url();
    let (code, body) = http(
        "POST",
        &format!("{base}/api/v1/volumes"),
        Some(r#"{"name":"v1","size":"64MiB"}"#),
    );
    assert_eq!(code, 201, "{body}");
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "GET",
            format!("{base}/api/v1/volumes/none"),
            None,
            404,
            "does not exist",
        ),
        (
            "DELETE",
            format!("{base}/api/v1/volumes/none"),
            None,
            404,
            "none",
        ),
        (
            "POST",
            format!("{base}/api/v1/volumes"),
            Some(r#"{"name":"v2","size":"12 parsecs"}"#),
            400,
            "",
        ),
        (
            "POST",
            format!("{base}/api/v1/volumes"),
            Some(r#"{"name":"v2","size":0}"#),
            400,
            "",
        ),
        (
            "POST",
            format!("{base}/api/v1/volumes"),
            Some(r#"{"name":"../x","size":"1GiB"}"#),
            400,
            "",
        ),
        (
            "POST",
            format!("{base}/api/v1/volumes"),
            Some(r#"{"nom":"v2"}"#),
            400,
            "bad request body",
        ),
        (
            "POST",
            format!("{base}/api/v1/volumes"),
            Some("not json"),
            400,
            "bad request body",
        ),
        (
            "POST",
            format!("{base}/api/v1/volumes"),
            Some(r#"{"name":"v1","size":"64MiB"}"#),
            409,
            "exists",
        ),
        (
            "GET",
            format!("{base}/api/v1/volumes/v1/locate?lba=999999999"),
            None,
            400,
            "past the end",
        ),
        (
            "GET",
            format!("{base}/api/v1/volumes/v1/locate?lba=x"),
            None,
            400,
            "",
        ),
        (
            "GET",
            format!("{base}/api/v1/nothing"),
            None,
            404,
            "no such endpoint",
        ),
        (
            "DELETE",
            format!("{base}/api/v1/volumes/v1/resize"),
            None,
            405,
            "does not take DELETE",
        ),
        (
            // The framework's own refusals (a name that is not UTF-8) are JSON too.
            "GET",
            format!("{base}/api/v1/volumes/%FF"),
            None,
            400,
            "UTF-8",
        ),
        (
            "GET",
            format!("{base}/api/v1/events?after=x"),
            None,
            400,
            "after",
        ),
        (
            "PUT",
            format!("{base}/api/v1/volumes"),
            Some("{}"),
            405,
            "does not take PUT",
        ),
        (
            "POST",
            format!("{base}/api/v1/faults/drop"),
            Some(r#"{"to":"n2"}"#),
            400,
            "alone",
        ),
        (
            "POST",
            format!("{base}/api/v1/faults/corrupt"),
            Some(r#"{"volume":"none","lba":0}"#),
            404,
            "does not exist",
        ),
        (
            "POST",
            format!("{base}/api/v1/faults/corrupt"),
            Some(r#"{"volume":"v1","lba":0,"target":"disk"}"#),
            400,
            "target",
        ),
        (
            "POST",
            format!("{base}/api/v1/scrub"),
            Some(r#"{"volume":"none"}"#),
            404,
            "does not exist",
        ),
        (
            "POST",
            format!("{base}/api/v1/volumes/none/resize"),
            Some(r#"{"size":"128MiB"}"#),
            404,
            "none",
        ),
        (
            "POST",
            format!("{base}/api/v1/volumes/v1/resize"),
            Some(r#"{"size":"32MiB"}"#),
            400,
            "shrinking",
        ),
        (
            "POST",
            format!("{base}/api/v1/volumes/v1/resize"),
            Some(r#"{"size":"12 parsecs"}"#),
            400,
            "",
        ),
        (
            "POST",
            format!("{base}/api/v1/volumes/v1/resize"),
            Some(r#"{"size":"64MiB","x":1}"#),
            400,
            "bad request body",
        ),
    ];
    for (method, url, body, want, text) in &cases {
        let (code, resp) = http(method, url, *body);
        assert_eq!(code, *want, "{method} {url} {body:?}: {resp}");
        let e = error_of(&resp);
        assert!(
            e.contains(text),
            "{method} {url}: error {e:?} lacks {text:?}"
        );
    }
    // Nothing changed: still exactly v1.
    let (_, list) = http("GET", &format!("{base}/api/v1/volumes"), None);
    let names: Vec<String> = serde_json::from_str::<Value>(&list)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["v1"]);
    let (_, v1) = http("GET", &format!("{base}/api/v1/volumes/v1"), None);
    assert_eq!(
        serde_json::from_str::<Value>(&v1).unwrap()["size_bytes"],
        64 << 20,
        "a refused resize changed the size: {v1}"
    );
    // A single node grows its volume too; the new space reads as zeroes, takes writes,
    // and the size survives a restart.
    let (code, body) = http(
        "POST",
        &format!("{base}/api/v1/volumes/v1/resize"),
        Some(r#"{"size":"100MiB"}"#),
    );
    assert_eq!(code, 200, "{body}");
    let uri = node.uri("v1");
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0 64M 1M",
            "-c",
            "write -P 0x3c 99M 1M",
            "-c",
            "flush",
            &uri,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    node.restart();
    assert_eq!(node.api_get("/api/v1/volumes/v1")["size_bytes"], 100 << 20);
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x3c 99M 1M", &node.uri("v1")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let base = node.api_url();

    let (code, doc) = http("GET", &format!("{base}/api/v1/openapi.json"), None);
    assert_eq!(code, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/api/v1/volumes",
        "/api/v1/volumes/{name}",
        "/api/v1/cluster",
        "/metrics",
        "/api/v1/faults/corrupt",
        "/api/v1/repairs",
        "/api/v1/volumes/{name}/resize",
        "/api/v1/dashboard",
        "/api/v1/scrub",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
}

#[test]
fn metrics_parse_and_move_with_io() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(tmp.path(), NodeOpts::default());
    node.create_volume("m", "64MiB");
    let scrape = |name: &str| -> f64 {
        // Parsed with the Prometheus project's own text parser.
        let script = format!(
            "import sys, urllib.request\nfrom prometheus_client.parser import text_string_to_metric_families as p\n\
             t = urllib.request.urlopen('{}/metrics').read().decode()\ntotal = 0.0\n\
             for f in p(t):\n    for s in f.samples:\n        if s.name == '{name}' and s.labels.get('volume') == 'm' and s.labels.get('op', 'write') == 'write':\n            total += s.value\nprint(total)",
            node.api_url()
        );
        let o = Command::new("/usr/bin/python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    };
    let before = scrape("lazarus_requests_total");
    let bytes_before = scrape("lazarus_request_bytes_total");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 4M 64k",
            &node.uri("m"),
        ],
    );
    assert_eq!(scrape("lazarus_requests_total") - before, 2.0);
    assert_eq!(
        scrape("lazarus_request_bytes_total") - bytes_before,
        (1 << 20) as f64 + 65536.0
    );
    assert!(scrape("lazarus_request_duration_seconds_count") >= 2.0);
    assert_eq!(scrape("lazarus_volume_size_bytes"), (64u64 << 20) as f64);
}

/// `lazarus volume import` / `export` round trip of a sparse raw image, compared with
/// `qemu-img compare`; holes stay holes in the export; bytes the volume held before the
/// import are gone (zeroes where the image has holes).
#[test]
fn import_export_round_trip_of_a_sparse_image() {
    require("qemu-img");
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("img", "64MiB");
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xee 0 64M", &node.uri("img")],
    );
    let src = tmp.path().join("src.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(48 << 20).unwrap(); // shorter than the volume: the rest must read as zero
        let mut rng = fastrand::Rng::with_seed(seed());
        let mut chunk = vec![0u8; 3 << 20];
        rng.fill(&mut chunk);
        f.write_all_at(&chunk[..1 << 20], 0).unwrap();
        f.write_all_at(&chunk, 20 << 20).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 40 << 20).unwrap(); // written zeroes, not a hole
        f.write_all_at(&chunk[..5000], (47 << 20) + 123).unwrap(); // unaligned
    }
    let out = node.cli(&["volume", "import", src.to_str().unwrap(), "--volume", "img"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The volume equals the image followed by zeroes.
    let padded = tmp.path().join("padded.img");
    std::fs::copy(&src, &padded).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&padded)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let o = run_out(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            padded.to_str().unwrap(),
            &node.uri("img"),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let back = tmp.path().join("back.img");
    let out = node.cli(&["volume", "export", "img", back.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = run_out(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            padded.to_str().unwrap(),
            back.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // Sparse: about the 4 MiB of data is allocated, not 64 MiB.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&back).unwrap().blocks() * 512;
    assert!(allocated < 8 << 20, "export allocated {allocated} bytes");
}

/// A node run from a configuration file takes no fault injection unless the file asks
/// for it: every fault endpoint answers 403 with a clear error and changes nothing.
/// With `faults = true` the same request is taken.
#[test]
fn fault_injection_is_off_unless_configured() {
    require("curl");
    let tmp = tempfile::tempdir().unwrap();
    let off = Node::start_with(
        &tmp.path().join("off"),
        "t1",
        "faults = false\n",
        NodeOpts::default(),
    );
    let on = Node::start(&tmp.path().join("on"), NodeOpts::default());
    for node in [&off, &on] {
        node.create_volume("v1", "1MiB");
    }
    let base = off.api_url();
    for (path, body) in [
        ("eio", r#"{"volume":"v1","lba":0}"#),
        ("device", r#"{"failed":true}"#),
        ("corrupt", r#"{"volume":"v1","lba":0}"#),
        ("heal", "{}"),
    ] {
        let (code, resp) = http("POST", &format!("{base}/api/v1/faults/{path}"), Some(body));
        assert_eq!(code, 403, "{path}: {resp}");
        assert!(
            error_of(&resp).contains("fault injection is off"),
            "{path}: {resp}"
        );
    }
    // Nothing was injected: the volume reads.
    let (code, resp) = http(
        "GET",
        &format!("{base}/api/v1/volumes/v1/data?offset=0&length=4096"),
        None,
    );
    assert_eq!(code, 200, "{resp}");
    // Turned on, the same kind of request reaches its handler (which, on a node
    // without a cluster, has nothing to fault but a device).
    let (code, resp) = http(
        "POST",
        &format!("{}/api/v1/faults/device", on.api_url()),
        Some(r#"{"failed":false}"#),
    );
    assert_ne!(code, 403, "{resp}");
    assert!(!resp.contains("fault injection is off"), "{resp}");
}
