//! Server benchmark: xorb upload-and-verify throughput, and reconstruction
//! latency under 64 concurrent clients (wrk). Starts the release
//! `cas-server` on a temp dir and a loopback port; compares upload
//! throughput with in-process verification of the same xorbs in the same
//! run (the server cannot accept faster than it can verify).
//!
//! Run: `cargo build --release --workspace && target/release/server-bench`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use cas_bench::{bf16_weights, pack};
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::xorb::{Compression, XorbView};
use cas_protocol::{ChunkRange, FileHash, Kind, Message, Sha256};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// MiB of bf16 weights to upload (in xorbs of up to 64 MiB).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Concurrent upload connections.
    #[arg(long, default_value_t = 4)]
    uploaders: usize,
    /// wrk connections for the reconstruction latency run.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_owned();
    let dir = tempfile::tempdir()?;
    let mut server = Command::new(exe_dir.join("cas-server"))
        .args(["--listen", "127.0.0.1:0", "--log", "warn", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .context("start cas-server (build it with --release first)")?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().context("stdout")?).read_line(&mut line)?;
    let base = line
        .trim()
        .strip_prefix("cas-server listening on ")
        .context("server banner")?
        .to_owned();
    let result = run(&args, &base, dir.path());
    server.kill()?;
    server.wait()?;
    result
}

fn run(args: &Args, base: &str, data_dir: &std::path::Path) -> anyhow::Result<()> {
    eprintln!(
        "generating {} MiB of bf16 weights and packing xorbs ...",
        args.mib
    );
    let data = bf16_weights(11, args.mib << 20);
    let xorbs = pack(&data, Compression::default());
    let total: usize = xorbs.iter().map(|x| x.bytes.len()).sum();

    // Baseline in the same run: verification alone, one thread.
    let t = Instant::now();
    for x in &xorbs {
        XorbView::parse(&x.bytes)?.verify(x.hash)?;
    }
    let verify_1t = total as f64 / t.elapsed().as_secs_f64();

    // Baseline in the same run: writing and fsyncing the same bytes to the
    // disk the server's data dir is on (the durability cost).
    let t = Instant::now();
    for x in &xorbs {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new_in(data_dir)?;
        f.write_all(&x.bytes)?;
        f.as_file().sync_all()?;
    }
    let disk = total as f64 / t.elapsed().as_secs_f64();

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let t = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..args.uploaders)
            .map(|k| {
                let (agent, xorbs) = (agent.clone(), &xorbs);
                s.spawn(move || -> anyhow::Result<()> {
                    for x in xorbs.iter().skip(k).step_by(args.uploaders) {
                        let r = agent
                            .put(format!("{base}/v1/xorbs/{}", x.hash))
                            .send(&x.bytes[..])?;
                        if r.status() != 201 {
                            bail!("upload failed: {}", r.status());
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("uploader"))
    })?;
    let upload = total as f64 / t.elapsed().as_secs_f64();
    println!(
        "xorb upload+verify: {:.0} MB/s over {} xorbs ({:.0} MiB) with {} connections; \
         in-process verify, 1 thread: {:.0} MB/s (ratio {:.2}); write+fsync to the same disk: {:.0} MB/s (ratio {:.2})",
        upload / 1e6,
        xorbs.len(),
        total as f64 / (1 << 20) as f64,
        args.uploaders,
        verify_1t / 1e6,
        upload / verify_1t,
        disk / 1e6,
        upload / disk
    );

    // Register the data as one file, then measure reconstruction latency.
    let chunks_all: Vec<_> = xorbs.iter().flat_map(|x| x.chunks.clone()).collect();
    let recipe = FileRecipe {
        hash: FileHash::from_chunks(&chunks_all),
        sha256: Sha256::of(&data),
        size: data.len() as u64,
        terms: xorbs
            .iter()
            .map(|x| Term {
                xorb: x.hash,
                chunks: ChunkRange {
                    start: 0,
                    end: x.chunks.len() as u32,
                },
                len: x.chunks.iter().map(|c| u64::from(c.len)).sum(),
            })
            .collect(),
        kind: Kind::File,
    };
    let shard = Shard {
        xorbs: xorbs.iter().map(XorbChunkTable::from).collect(),
        files: vec![recipe.clone()],
    };
    let r = agent
        .post(format!("{base}/v1/shards"))
        .send(&shard.to_bytes()[..])?;
    if r.status() != 200 {
        bail!("shard commit failed: {}", r.status());
    }
    let url = format!("{base}/v1/reconstructions/{}", recipe.hash);
    for (name, header) in [
        ("whole file", None),
        ("1 MiB range", Some("Range: bytes=100000000-101048575")),
    ] {
        let (p50, p99, rps) = wrk(&url, header, args)?;
        println!(
            "reconstruction ({name}), {} connections: p50 {p50}, p99 {p99}, {rps} requests/s",
            args.connections
        );
    }
    Ok(())
}

/// Runs wrk and returns (p50, p99, requests/s) as wrk prints them.
fn wrk(url: &str, header: Option<&str>, args: &Args) -> anyhow::Result<(String, String, String)> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t2",
        &format!("-c{}", args.connections),
        &format!("-d{}s", args.seconds),
        "--latency",
    ]);
    cmd.args(["-H", "Accept: application/octet-stream"]);
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(url)
        .output()
        .context("run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        bail!("wrk saw errors:\n{text}");
    }
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
            .with_context(|| format!("no {prefix:?} in wrk output:\n{text}"))
    };
    Ok((field("50%")?, field("99%")?, field("Requests/sec:")?))
}
