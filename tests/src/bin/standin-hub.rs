//! `standin-hub DIR [datasets/]ORG/NAME [--listen HOST] [--cdn URL BLOBS]`: serves the
//! files under DIR as revision `main` of that model (or dataset) from the tests' stand-in Hub
//! (tests/src/standin.rs) for benchmarks (bench/mirror-bench). With
//! `--cdn`, large files redirect to `URL/blobs/<sha256>`, and BLOBS gets a
//! symlink `<sha256>` to each, for a web server (nginx) at URL to serve.
//! `--listen` binds HOST (default 127.0.0.1), say the server end of
//! bench/shaped-link.
//! Prints `standin-hub listening on <url>` and serves until killed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cas_e2e::standin::{File, StandIn};

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).expect("readable directory") {
        let path = e.expect("directory entry").path();
        if path.is_dir() {
            walk(root, &path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.insert(rel, std::fs::read(&path).expect("readable file"));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: standin-hub DIR [datasets/]ORG/NAME [--listen HOST] [--cdn URL BLOBS]";
    let (dir, id) = match (args.first(), args.get(1)) {
        (Some(d), Some(i)) => (PathBuf::from(d), i.clone()),
        _ => panic!("{usage}"),
    };
    let mut host = "127.0.0.1".to_owned();
    let mut cdn = None;
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        let mut value = || rest.next().expect(usage).clone();
        match flag.as_str() {
            "--listen" => host = value(),
            "--cdn" => cdn = Some((value(), PathBuf::from(value()))),
            _ => panic!("{usage}"),
        }
    }
    let mut files = BTreeMap::new();
    walk(&dir, &dir, &mut files);
    if let Some((_, blobs)) = &cdn {
        std::fs::create_dir_all(blobs).unwrap();
        for (rel, data) in &files {
            let f = File::new(data.clone());
            let link = blobs.join(&f.sha256);
            if f.lfs && !link.exists() {
                std::os::unix::fs::symlink(std::fs::canonicalize(dir.join(rel)).unwrap(), link)
                    .unwrap();
            }
        }
    }
    let hub = StandIn::start_with_cdn(&host, cdn.as_ref().map(|c| c.0.as_str()));
    let key = if id.starts_with("datasets/") {
        id.clone()
    } else {
        format!("models/{id}")
    };
    hub.commit(
        &key,
        "main",
        "1111111111111111111111111111111111111111",
        &files,
    );
    drop(files);
    println!("standin-hub listening on {}", hub.url);
    loop {
        std::thread::park();
    }
}
