//! Shard decoding (binary and JSON) plus recipe verification, and the other
//! query messages, on arbitrary bytes.
#![no_main]

use cas_protocol::messages::{DedupAnswer, DedupQuery, Reconstruction};
use cas_protocol::shard::Shard;
use cas_protocol::Message;
use libfuzzer_sys::fuzz_target;

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = M::from_bytes(data) {
        // Anything accepted re-encodes to bytes that decode to the same value.
        assert_eq!(M::from_bytes(&m.to_bytes()).unwrap(), m);
        assert_eq!(M::from_json(m.to_json().as_bytes()).unwrap(), m);
    }
    let _ = M::from_json(data);
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Shard>(data);
    if let Ok(shard) = Shard::from_bytes(data) {
        for f in &shard.files {
            let _ = f.verify(|h| shard.xorbs.iter().find(|x| x.hash == *h).map(|x| &x.chunks[..]));
        }
    }
    round_trip::<Reconstruction>(data);
    round_trip::<DedupQuery>(data);
    round_trip::<DedupAnswer>(data);
});
