//! A byte stream from a peer read as RPC frames, each body also split as a packed
//! (JSON header, raw payload) body: never a panic, never more memory than the bytes
//! that arrived (a frame announcing 64 MiB and carrying 10 bytes allocates little).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread().build().unwrap()
});

fuzz_target!(|data: &[u8]| {
    RT.block_on(async {
        let mut rd = data;
        let mut total = 0usize;
        while let Ok((_id, _kind, body)) = lazarus_rpc::read_frame(&mut rd).await {
            total += 13 + body.len();
            assert!(total <= data.len());
            if let Ok((json, raw)) = lazarus_rpc::unpack(&body) {
                assert_eq!(4 + json.len() + raw.len(), body.len());
            }
        }
    });
});
