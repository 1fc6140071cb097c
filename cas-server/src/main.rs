//! `cas-server`: runs the CAS server with its embedded default stores.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// A verifying content-addressed chunk store server.
///
/// With no arguments it serves on 127.0.0.1:8080 with its data in
/// ./cas-data: xorbs and shards as files under cas-data/objects, the index
/// in RocksDB under cas-data/index.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "CAS_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory holding objects and index; created if missing.
    #[arg(long, env = "CAS_DATA_DIR", default_value = "./cas-data")]
    data_dir: PathBuf,
    /// Base URL that reconstruction answers use for xorb reads, e.g. a CDN or
    /// caching proxy in front of this server. Default: the host the client used.
    #[arg(long, env = "CAS_PUBLIC_URL")]
    public_url: Option<String>,
    /// Xorb uploads verified concurrently; each holds up to 64 MiB in memory.
    #[arg(long, env = "CAS_MAX_CONCURRENT_UPLOADS", default_value_t = 8)]
    max_concurrent_uploads: usize,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `cas_server=debug`.
    #[arg(long, env = "CAS_LOG", default_value = "info")]
    log: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: each error's message already includes its cause
            // (e.g. the RocksDB lock another server holds on this data dir).
            eprintln!("cas-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).context("invalid --log filter")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = cas_server::Config {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        public_url: args.public_url,
        max_concurrent_uploads: args.max_concurrent_uploads,
    };
    let server = cas_server::Server::bind(config).await?;
    let addr = server.local_addr()?;
    // One line on stdout that scripts and tests can read.
    println!("cas-server listening on http://{addr}");
    tracing::info!(
        data_dir = %args.data_dir.display(),
        "serving: xorbs and shards on the local filesystem, index in RocksDB"
    );
    server.run(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
