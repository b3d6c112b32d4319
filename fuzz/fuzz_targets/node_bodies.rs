//! The bodies of node-to-node requests and answers (`lazarus_rpc::msg`), decoded from a
//! peer's bytes as a node decodes them: the first byte picks the kind, the rest is a
//! packed (JSON, raw payload) body. Never a panic; whatever decodes encodes again to
//! something that decodes to the same value.
#![no_main]
use lazarus_rpc::msg::{ForwardReply, ForwardReq, LeaseReply, LeaseRequest, RootReq, SyncReq, Update};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fn roundtrip<T: Serialize + DeserializeOwned + std::fmt::Debug>(json: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(json) {
        let again = serde_json::to_vec(&v).expect("a decoded body encodes");
        let back: T = serde_json::from_slice(&again).expect("an encoded body decodes");
        assert_eq!(format!("{v:?}"), format!("{back:?}"));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let json = match lazarus_rpc::unpack(body) {
        Ok((json, _raw)) => json,
        Err(_) => body,
    };
    match kind % 7 {
        0 => roundtrip::<ForwardReq>(json),
        1 => roundtrip::<ForwardReply>(json),
        2 => roundtrip::<LeaseRequest>(json),
        3 => roundtrip::<LeaseReply>(json),
        4 => roundtrip::<RootReq>(json),
        5 => roundtrip::<SyncReq>(json),
        _ => roundtrip::<Update>(json),
    }
});
