//! The agent's request decoder never panics, and a request it reads survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use randport_plugin::agent::rpc::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<Request>(data) {
        let bytes = serde_json::to_vec(&request).expect("encoding a request");
        let again: Request = serde_json::from_slice(&bytes).expect("re-reading our own encoding");
        assert_eq!(again, request);
    }
});
