//! Commit decoding (binary and JSON) and name parsing on arbitrary bytes:
//! an accepted commit re-encodes to itself under the same id; an accepted
//! ref name survives its key form, and an accepted repository id is made
//! of path-safe names.
#![no_main]

use cas_protocol::repo::{Commit, RefName, RepoId, RepoType};
use cas_protocol::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for commit in [Commit::from_bytes(data), Commit::from_json(data)].into_iter().flatten() {
        let again = Commit::from_bytes(&commit.to_bytes()).unwrap();
        assert_eq!(again.id(), commit.id());
        assert_eq!(again, commit);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(name) = RefName::new(s) {
            let key = name.key_segment();
            assert!(!key.contains('/') && key.len() <= 255 && key != "." && key != "..");
            assert_eq!(RefName::from_key_segment(&key).unwrap(), name);
        }
        let _ = RefName::from_key_segment(s);
        if let Ok(repo) = RepoId::parse(s, RepoType::Model) {
            for part in [repo.org(), repo.name()] {
                assert!(!part.contains('/') && part != "." && part != "..");
            }
        }
    }
});
