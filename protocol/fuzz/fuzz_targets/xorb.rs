//! Xorb parser, frame reader and verifier on arbitrary bytes: every input
//! must yield a value or an error, never a panic or an unbounded allocation.
#![no_main]

use cas_protocol::xorb::{parse_header, Frames, XorbView};
use cas_protocol::{ChunkRange, XorbHash};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_header(data);
    if let Ok(view) = XorbView::parse(data) {
        let hash = view.hash();
        let verified = view.verify(hash);
        let n = view.chunk_count() as u32;
        let range = view.byte_range(ChunkRange { start: n / 2, end: n }).expect("valid range");
        let mut out = Vec::new();
        for (i, frame) in Frames::new(&data[range.start as usize..range.end as usize], 0).enumerate() {
            let frame = frame.expect("frames of a parsed xorb are well formed");
            let _ = frame.decode_into(i, &mut out);
        }
        if verified.is_ok() {
            // A verified xorb decodes completely and re-hashes identically.
            let mut all = Vec::new();
            for i in 0..view.chunk_count() {
                view.frame(i).unwrap().decode_into(i, &mut all).unwrap();
            }
            assert_eq!(all.len() as u64, view.chunks().iter().map(|c| u64::from(c.len)).sum::<u64>());
            assert_eq!(XorbHash::from_chunks(&view.chunks()), hash);
        }
    }
    // Raw frame runs, as a client reads them from a range response.
    for frame in Frames::new(data, 0).take(64) {
        let Ok(frame) = frame else { break };
        let _ = frame.decode_into(0, &mut Vec::new());
    }
});
