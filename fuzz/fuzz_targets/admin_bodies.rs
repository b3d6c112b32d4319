//! A run of admin API requests (any endpoint, any method, arbitrary query and body) to
//! the real router of a single node over a fresh store holding volume "v", 1 MiB.
//! Each chunk (split at 0xfe) is a route byte, a method byte, then the query text up
//! to the first 0xfd and the body after it.
//!
//! The first byte's low bit turns fault injection on (`corrupt`, `eio`, `device`: the
//! store then answers some requests with errors of its own).
//!
//! Never a panic. Every answer that is not a success is JSON `{"error": "..."}`, with
//! a 4xx status, or 503/507 (never a 500 unless faults were injected: bad input is the
//! client's error). And the bytes are right, faults or not: a model of "v" (bytes
//! written and zeroed through the API) must match every read that succeeds.
#![no_main]
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use lazarus_engine::engine::Engine;
use lazarus_server::admin::{router, AppState, MutationGuard};
use lazarus_store::{Store, StoreOptions};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use tower::ServiceExt;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
});

/// Paths: `{}` is the volume name (usually "v").
const ROUTES: &[&str] = &[
    "/api/v1/volumes",
    "/api/v1/volumes/{}",
    "/api/v1/volumes/{}/resize",
    "/api/v1/volumes/{}/data",
    "/api/v1/volumes/{}/zero",
    "/api/v1/volumes/{}/flush",
    "/api/v1/volumes/{}/map",
    "/api/v1/volumes/{}/locate",
    "/api/v1/volumes/{}/repair",
    "/api/v1/volumes/{}/protect",
    "/api/v1/scrub",
    "/api/v1/faults/corrupt",
    "/api/v1/faults/eio",
    "/api/v1/faults/device",
    "/api/v1/faults/isolate",
    "/api/v1/faults/drop",
    "/api/v1/faults/heal",
    "/api/v1/status",
    "/api/v1/events",
    "/api/v1/repairs",
    "/api/v1/dashboard",
    "/metrics",
];
const METHODS: &[Method] = &[Method::GET, Method::POST, Method::PUT, Method::DELETE];

/// Volume "v" as the API was told to make it: bytes written (absent = zero).
struct Model {
    exists: bool,
    bytes: BTreeMap<u64, u8>,
}

/// At most 200 characters of `s`, for messages.
fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

fn query_u64(q: &str, key: &str) -> Option<u64> {
    q.split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else { return };
    let faults = flags & 1 == 1;
    let dir = std::env::temp_dir().join(format!("lzfuzz-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A failed device is the process's record of a folder: the last input's is healed.
    lazarus_store::disk::set_device_failed(&dir, false);
    let store = Arc::new(Store::open(&dir, StoreOptions { journal_bytes: 8 << 20, ..Default::default() }).unwrap());
    store.create_volume("v", 1 << 20).unwrap();
    let state = AppState {
        guard: MutationGuard::new("127.0.0.1:0".parse().unwrap(), None),
        faults,
        node_id: "n1".into(),
        engine: Arc::new(Engine::new(store)),
        cluster: None,
    };
    let app = router(state);
    let mut model = Model { exists: true, bytes: BTreeMap::new() };
    RT.block_on(async {
        for chunk in data.split(|b| *b == 0xfe).take(16) {
            let [r, m, rest @ ..] = chunk else { continue };
            let (query, body) = match rest.iter().position(|b| *b == 0xfd) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let query = String::from_utf8_lossy(query).into_owned();
            // Mostly volume "v"; sometimes a name from the query text (percent-encoded
            // as a client would).
            let name = if m & 0x80 == 0 { "v" } else { query.as_str() };
            let route = ROUTES[*r as usize % ROUTES.len()];
            let path = route.replace("{}", &name.bytes().map(|b| format!("%{b:02X}")).collect::<String>());
            let method = METHODS[(*m as usize) % METHODS.len()].clone();
            let uri = if query.is_empty() || m & 0x40 != 0 {
                path.clone()
            } else {
                format!("{path}?{}", query.bytes().map(|b| format!("%{b:02X}")).collect::<String>().replace("%3D", "=").replace("%26", "&"))
            };
            let Ok(req) = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .header("content-type", "application/json")
                .body(Body::from(body.to_vec()))
            else {
                continue;
            };
            let resp = app.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            if !status.is_success() {
                assert!(
                    faults
                        || status.is_client_error()
                        || status == StatusCode::SERVICE_UNAVAILABLE
                        || status == StatusCode::INSUFFICIENT_STORAGE,
                    "{method} {} answered {status}: {}",
                    short(&uri),
                    short(&String::from_utf8_lossy(&bytes))
                );
                let v: serde_json::Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{method} {} {status}: not JSON ({e}): {}", short(&uri), short(&String::from_utf8_lossy(&bytes))));
                assert!(v["error"].is_string(), "{method} {} {status}: {v}", short(&uri));
                continue;
            }
            // The model of "v" follows what succeeded.
            let on_v = name == "v";
            let q = if m & 0x40 != 0 { "" } else { query.as_str() };
            match (route.rsplit('/').next().unwrap_or(""), method.as_str()) {
                ("volumes", "POST") => {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    if v["name"] == "v" {
                        model = Model { exists: true, bytes: BTreeMap::new() };
                    }
                }
                ("{}", "DELETE") if on_v => model.exists = false,
                ("data", "PUT") if on_v && model.exists => {
                    let off = query_u64(q, "offset").unwrap();
                    for (i, b) in body.iter().enumerate() {
                        model.bytes.insert(off + i as u64, *b);
                    }
                }
                ("zero", "POST") if on_v && model.exists => {
                    let off = query_u64(q, "offset").unwrap();
                    let len = query_u64(q, "length").unwrap();
                    let gone: Vec<u64> = model.bytes.range(off..off + len).map(|(k, _)| *k).collect();
                    for k in gone {
                        model.bytes.remove(&k);
                    }
                }
                ("data", "GET") if on_v && model.exists => {
                    let off = query_u64(q, "offset").unwrap();
                    for (i, b) in bytes.iter().enumerate().take(1 << 16) {
                        let want = model.bytes.get(&(off + i as u64)).copied().unwrap_or(0);
                        assert_eq!(*b, want, "GET {}: byte {} of the volume", short(&uri), off + i as u64);
                    }
                }
                _ => {}
            }
        }
    });
    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
});
