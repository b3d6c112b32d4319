//! A run of requests from the wire to a recovery server on a fresh folder: each chunk
//! (split at 0xfe) is a request kind byte and a body. Never a panic; every file the
//! server makes stays inside its folder; the server opens again afterwards, whatever
//! the requests did (or reports an error).
#![no_main]
use lazarus_recovery::server::RecoveryServer;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
});

fuzz_target!(|data: &[u8]| {
    let root = std::env::temp_dir().join(format!("lzfuzz-rs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("rs");
    let rs = RecoveryServer::open(&dir).unwrap();
    RT.block_on(async {
        for chunk in data.split(|b| *b == 0xfe).take(32) {
            let Some((&k, body)) = chunk.split_first() else { continue };
            // Mostly the recovery server's own kinds (40..=48), sometimes any byte.
            let kind = if k < 0xc0 { 40 + k % 9 } else { k };
            let _ = rs.handle(kind, body.to_vec()).await;
        }
    });
    drop(rs);
    // Nothing next to the server's folder.
    let names: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("rs")], "a file outside the folder");
    let _ = RecoveryServer::open(&dir);
    let _ = std::fs::remove_dir_all(&root);
});
