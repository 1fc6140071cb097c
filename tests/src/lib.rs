//! Helpers for the end-to-end tests in tests/: they run the real binaries
//! that `cargo build --workspace --bins` put next to the test executables.

use std::path::PathBuf;
use std::process::Command;

/// A command for one of the workspace's binaries (`cas-client`, `cas-server`).
///
/// Panics with instructions when the binary has not been built: a test that
/// silently skipped would prove nothing.
pub fn bin(name: &str) -> Command {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile dir");
    let path: PathBuf = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    Command::new(path)
}
