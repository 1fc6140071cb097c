//! Tree decoding (binary and JSON) on arbitrary bytes; an accepted tree must
//! hold only safe relative paths.
#![no_main]

use cas_protocol::tree::{check_path, Tree};
use cas_protocol::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for tree in [Tree::from_bytes(data), Tree::from_json(data)].into_iter().flatten() {
        for e in &tree.entries {
            assert!(check_path(&e.path).is_ok());
            assert!(!e.path.split('/').any(|c| c == ".." || c.is_empty()));
        }
        assert_eq!(Tree::from_bytes(&tree.to_bytes()).unwrap(), tree);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = check_path(s);
    }
});
