//! `cas-server`: runs the CAS server with its embedded default stores.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use cas_server::auth::{self, Claims, RepoPattern, Scope, SigningKey};
use clap::{Parser, Subcommand};

/// A verifying content-addressed chunk store server.
///
/// With no arguments it serves on 127.0.0.1:8080 with its data in
/// ./cas-data: xorbs and shards as files under cas-data/objects, the index
/// in RocksDB under cas-data/index.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// File holding the token signing key (hex). With it every API call
    /// needs a token; without it only loopback clients are served.
    #[arg(long, env = "CAS_SIGNING_KEY_FILE", global = true)]
    signing_key_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Manage tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage the signing key.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a token signed with --signing-key-file.
    Create {
        /// Scopes it grants: read (fetch), write (upload); repeat for both.
        #[arg(long = "scope", required = true)]
        scopes: Vec<Scope>,
        /// Lifetime: a number with s, m, h or d, e.g. 24h.
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: u64,
        /// Limit the token to repositories: ORG/NAME or ORG/*, optionally
        /// after models/ or datasets/ (else both types); repeat for more.
        #[arg(long = "repo", value_name = "PATTERN")]
        repos: Vec<RepoPattern>,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new random signing key to PATH (mode 0600; never overwrites).
    Create { path: PathBuf },
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let mult = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit in {s:?} (s, m, h or d)")),
    };
    n.checked_mul(mult)
        .filter(|&t| t > 0)
        .ok_or_else(|| format!("not a usable duration: {s:?}"))
}

fn key(path: Option<&PathBuf>) -> anyhow::Result<Option<SigningKey>> {
    path.map(|p| SigningKey::from_file(p).map_err(anyhow::Error::from))
        .transpose()
}

/// `token create` and `key create`.
fn admin(command: Command, key_file: Option<&PathBuf>) -> anyhow::Result<()> {
    match command {
        Command::Token {
            command: TokenCommand::Create { scopes, ttl, repos },
        } => {
            let key = key(key_file)?
                .context("token create needs --signing-key-file (or CAS_SIGNING_KEY_FILE)")?;
            let exp = auth::now() + ttl;
            let repos = (!repos.is_empty()).then_some(repos);
            let token = key.sign(&Claims { scopes, exp, repos });
            if token.len() > auth::MAX_TOKEN_LEN {
                anyhow::bail!(
                    "the token would be {} bytes, more than the {} a server accepts: use fewer --repo patterns (ORG/* covers an organisation)",
                    token.len(),
                    auth::MAX_TOKEN_LEN
                );
            }
            println!("{token}");
            eprintln!("valid until {}", auth::utc(exp));
        }
        Command::Key {
            command: KeyCommand::Create { path },
        } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("{}", path.display()))?;
            writeln!(f, "{}", SigningKey::generate().to_hex())
                .with_context(|| format!("{}", path.display()))?;
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    let result = match args.command.take() {
        Some(c) => admin(c, args.signing_key_file.as_ref()),
        None => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(run(args))
        }
    };
    match result {
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
        signing_key: key(args.signing_key_file.as_ref())?,
    };
    let tokens = config.signing_key.is_some();
    let public_url_set = config.public_url.is_some();
    let server = cas_server::Server::bind(config).await?;
    let addr = server.local_addr()?;
    // One line on stdout that scripts and tests can read.
    println!("cas-server listening on http://{addr}");
    tracing::info!(
        data_dir = %args.data_dir.display(),
        "serving: xorbs and shards on the local filesystem, index in RocksDB"
    );
    if tokens {
        tracing::info!(
            "API calls need tokens (read: fetch, write: upload); xorb reads are capability URLs"
        );
    } else {
        tracing::warn!("no --signing-key-file: serving loopback clients only, without tokens");
        if public_url_set {
            // A proxy on this host is a loopback client: it would open the
            // whole API to whoever reaches the proxy.
            tracing::warn!("--public-url without --signing-key-file: a proxy on this host passes every client through; set a key");
        }
    }
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
