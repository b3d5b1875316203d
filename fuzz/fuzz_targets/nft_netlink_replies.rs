//! The agent reads the kernel's nftables netlink answers (dumps of our table's chains,
//! sets and rules; acknowledgements of element batches) without panicking on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use randport_plugin::netfilter::{netlink, nft_elements};

fuzz_target!(|data: &[u8]| {
    for (kind, _flags, body) in netlink::messages_with_flags(data) {
        let shape = netlink::shape_of(kind & 0xff, body);
        // A shape is a run of attributes again.
        let _ = netlink::attrs(&shape);
    }
    for (_seq, _kind, body) in nft_elements::answers(data) {
        let _ = netlink::attrs(body);
    }
});
