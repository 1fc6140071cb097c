//! `cas-server`: runs the CAS server with its embedded default stores.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use cas_server::auth::{self, Claims, RepoPattern, Scope, SigningKey};
use cas_server::core::gc::GcRun;
use cas_server::http::XorbReads;
use cas_server::store::S3Config;
use cas_server::{Limits, StoreConfig};
use clap::{Parser, Subcommand};

mod report;

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
    #[arg(
        long,
        env = "CAS_DATA_DIR",
        default_value = "./cas-data",
        global = true
    )]
    data_dir: PathBuf,
    /// Where objects live: `s3://BUCKET[/PREFIX]` (an S3 bucket several
    /// nodes can share; the index in --data-dir is then a cache of it) or
    /// `file://DIR` (the same as --data-dir DIR). Default: --data-dir.
    /// S3 credentials, region and endpoint come from the standard AWS
    /// environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    /// AWS_ENDPOINT_URL, AWS_ALLOW_HTTP) unless the flags below set them.
    #[arg(long, env = "CAS_STORE")]
    store: Option<String>,
    /// S3 endpoint for stores other than AWS (SeaweedFS, MinIO, Ceph), e.g.
    /// http://127.0.0.1:8333; plain HTTP is allowed on loopback only
    /// (else set AWS_ALLOW_HTTP=true).
    #[arg(long, env = "CAS_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// S3 region (else AWS_REGION, else us-east-1).
    #[arg(long, env = "CAS_S3_REGION")]
    s3_region: Option<String>,
    /// How long a call to the object store retries a failing store (5xx,
    /// 429, connection errors) before the request is answered 503
    /// store_unavailable.
    #[arg(long, env = "CAS_STORE_RETRY_TIMEOUT", default_value_t = Span(Duration::from_secs(15)))]
    store_retry_timeout: Span,
    /// With --store s3://: how often this node's index catches up with
    /// what other nodes committed to the bucket (dedup learns of their
    /// chunks this late; reads never wait for it: a miss catches up).
    #[arg(long, env = "CAS_CATCH_UP_EVERY", default_value_t = Span(Duration::from_secs(10)))]
    catch_up_every: Span,
    /// How xorb GETs are answered: `stream` (the node sends the bytes) or
    /// `redirect` (with --store s3://: 307 to a presigned S3 URL valid for
    /// 5 minutes, so the bytes bypass the node; the client follows it).
    #[arg(long, env = "CAS_XORB_READS", default_value = "stream", value_parser = parse_xorb_reads)]
    xorb_reads: XorbReads,
    /// Base URL that reconstruction answers use for xorb reads, e.g. a CDN or
    /// caching proxy in front of this server. Default: the address the client
    /// connected to (never its Host header, which it could forge).
    #[arg(long, env = "CAS_PUBLIC_URL")]
    public_url: Option<String>,
    /// Xorb uploads received and verified at once; a slot is taken once
    /// the body's first bytes arrive.
    #[arg(long, env = "CAS_MAX_CONCURRENT_UPLOADS", default_value_t = Limits::default().max_concurrent_uploads)]
    max_concurrent_uploads: usize,
    /// Open connections at most; at the cap the longest-idle one is closed
    /// for a new one. Default: from the file descriptor limit (raised to
    /// its hard limit at start), at most 4096.
    #[arg(long, env = "CAS_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Time a request head may take, from its first byte (ms, s, m, h).
    #[arg(long, env = "CAS_HEADER_TIMEOUT", default_value_t = Span(Limits::default().header_timeout))]
    header_timeout: Span,
    /// Time a connection may stay open with no request on it.
    #[arg(long, env = "CAS_IDLE_TIMEOUT", default_value_t = Span(Limits::default().idle_timeout))]
    idle_timeout: Span,
    /// A request body must deliver --body-progress bytes (or its end)
    /// within this time, again and again, or it is answered 408; an answer
    /// the client does not read for this long is dropped.
    #[arg(long, env = "CAS_BODY_TIMEOUT", default_value_t = Span(Limits::default().body_timeout))]
    body_timeout: Span,
    /// See --body-timeout (bytes; KiB, MiB and GiB suffixes).
    #[arg(long, env = "CAS_BODY_PROGRESS", default_value_t = Size(Limits::default().body_progress_bytes))]
    body_progress: Size,
    /// Memory for all request bodies buffered at once, together (at least
    /// one shard, 128MiB).
    #[arg(long, env = "CAS_BODY_BUDGET", default_value_t = Size(Limits::default().body_budget))]
    body_budget: Size,
    /// How long a request waits for body budget or an upload slot before it
    /// is answered 503.
    #[arg(long, env = "CAS_QUEUE_TIMEOUT", default_value_t = Span(Limits::default().queue_timeout))]
    queue_timeout: Span,
    /// How long what requests build on (the xorbs a dedup answer names,
    /// uploads, shard commits not yet rooted) is protected from garbage
    /// collection, and the grace period of gc runs the server makes.
    #[arg(long, env = "CAS_GC_GRACE", default_value_t = Span(cas_server::core::gc::DEFAULT_GRACE))]
    gc_grace: Span,
    /// Run garbage collection this often inside the server (with
    /// --gc-grace); default: only when asked (cas-server gc --endpoint).
    #[arg(long, env = "CAS_GC_INTERVAL")]
    gc_interval: Option<Span>,
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
    /// The node's index (a cache of the store).
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
    /// `index rebuild` under its first name.
    #[command(hide = true)]
    RebuildIndex,
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
    /// Collect garbage: files and xorbs no branch, tag or root reaches.
    /// A dead xorb is condemned first (it leaves dedup) and deleted by a
    /// run after the grace period, if still unreferenced. With --endpoint
    /// a running server does the run (an admin token); without, it runs
    /// on the --data-dir of a stopped server (see docs/OPERATIONS.md).
    Gc {
        /// Print the plan (what would be freed, by reason) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the plan and the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// How long a condemned xorb waits before it is deleted.
        #[arg(long, default_value_t = Span(cas_server::core::gc::DEFAULT_GRACE))]
        grace: Span,
        /// A running server (http://HOST:PORT) to run on (POST /v1/admin/gc).
        #[arg(long, env = "CAS_ENDPOINT")]
        endpoint: Option<String>,
        /// Bearer token with the admin scope for --endpoint.
        #[arg(long, env = "CAS_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Check that index and objects agree (exit code 0 only when clean);
    /// names damaged files and repositories.
    Fsck {
        /// Also read and verify every xorb's bytes.
        #[arg(long)]
        full: bool,
        #[arg(long)]
        json: bool,
    },
    /// Mark what fsck finds missing or corrupt damaged (out of dedup, so
    /// the next upload of that content heals it) and list what is lost.
    Repair {
        /// Also read and verify every xorb's bytes.
        #[arg(long)]
        full: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Rebuild the index in --data-dir from the objects in --store (give
    /// those flags before `index`); the server must be stopped. A server
    /// on S3 with an empty index does this by itself at start.
    Rebuild,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a token signed with --signing-key-file.
    Create {
        /// Scopes it grants: read (fetch), write (upload), admin (gc through
        /// the API); repeat for more.
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

/// A duration on the command line: a number with ms, s, m, h or d (a bare
/// number is seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span(Duration);

/// Why a duration did not parse.
enum SpanError {
    Invalid(String),
    /// Well-formed, but more than a `Duration` holds.
    TooLong,
}

fn span(s: &str) -> Result<Duration, SpanError> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| SpanError::Invalid(format!("not a duration: {s:?}")))?;
    let (base, mult) = match unit {
        "ms" => (Duration::from_millis(n), 1),
        "s" | "" => (Duration::from_secs(n), 1),
        "m" => (Duration::from_secs(n), 60),
        "h" => (Duration::from_secs(n), 3600),
        "d" => (Duration::from_secs(n), 86_400),
        _ => {
            return Err(SpanError::Invalid(format!(
                "unknown unit in {s:?} (ms, s, m, h or d)"
            )))
        }
    };
    match base.checked_mul(mult) {
        None => Err(SpanError::TooLong),
        Some(d) if d.is_zero() => Err(SpanError::Invalid(format!("{s:?} is no time at all"))),
        Some(d) => Ok(d),
    }
}

impl FromStr for Span {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        span(s).map(Span).map_err(|e| match e {
            SpanError::Invalid(m) => m,
            SpanError::TooLong => format!("{s:?} is too long"),
        })
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_millis() {
            ms if ms % 1000 == 0 => write!(f, "{}s", ms / 1000),
            ms => write!(f, "{ms}ms"),
        }
    }
}

/// A size on the command line: bytes, or a number with KiB, MiB or GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Size(usize);

const SIZE_UNITS: [(&str, usize); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
        let n: usize = n.parse().map_err(|_| format!("not a size: {s:?}"))?;
        let mult = match SIZE_UNITS.iter().find(|(u, _)| *u == unit) {
            Some((_, m)) => *m,
            None if unit.is_empty() => 1,
            None => return Err(format!("unknown unit in {s:?} (KiB, MiB or GiB)")),
        };
        n.checked_mul(mult)
            .filter(|&b| b > 0)
            .map(Size)
            .ok_or_else(|| format!("not a usable size: {s:?}"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match SIZE_UNITS.iter().find(|(_, m)| self.0.is_multiple_of(*m)) {
            Some((u, m)) => write!(f, "{}{u}", self.0 / m),
            None => write!(f, "{}", self.0),
        }
    }
}

/// Longest token lifetime: longer ones are mistakes (or overflow).
const MAX_TTL: Duration = Duration::from_secs(3650 * 86_400);

/// A token lifetime in seconds: a duration of at least a second and at
/// most ten years.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let too_long = || format!("{s:?} is longer than the longest token lifetime, 3650d");
    let ttl = match span(s) {
        Ok(ttl) if ttl > MAX_TTL => return Err(too_long()),
        Ok(ttl) => ttl,
        Err(SpanError::TooLong) => return Err(too_long()),
        Err(SpanError::Invalid(m)) => return Err(m),
    };
    match ttl.as_secs() {
        0 => Err(format!("{s:?} is shorter than a second")),
        secs => Ok(secs),
    }
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
            let exp = auth::now()
                .checked_add(ttl)
                .context("the clock is past any expiry")?;
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
        Command::Gc { .. } | Command::Fsck { .. } | Command::Repair { .. } => {
            unreachable!("maintenance commands run in maintain()")
        }
        Command::Index { .. } | Command::RebuildIndex => unreachable!("run by main"),
        Command::Key {
            command: KeyCommand::Create { path },
        } => create_key(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow!(
                "{} already exists; key create never overwrites a key",
                path.display()
            ),
            _ => anyhow!("cannot create key file {}: {e}", path.display()),
        })?,
    }
    Ok(())
}

/// Writes a new key to `path`, which must not exist (mode 0600); a failed
/// write leaves no file behind.
fn create_key(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let written = writeln!(f, "{}", SigningKey::generate().to_hex()).and_then(|()| f.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Prints `value` as one line of JSON.
fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(value).expect("json"));
}

fn print_gc(run: &GcRun, json: bool) {
    if json {
        print_json(run);
    } else {
        report::gc_plan(&run.plan);
        if let Some(r) = &run.report {
            report::gc_report(r);
        }
    }
}

/// `gc --endpoint`: the run a server makes (`POST /v1/admin/gc`).
async fn remote_gc(
    endpoint: &str,
    token: Option<&str>,
    dry_run: bool,
    grace: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let url = format!("{}/v1/admin/gc", endpoint.trim_end_matches('/'));
    let body = serde_json::json!({ "dry_run": dry_run, "grace_secs": grace.as_secs() });
    let mut req = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let text = resp.text().await.with_context(|| format!("POST {url}"))?;
    if !status.is_success() {
        anyhow::bail!("POST {url}: {status}: {}", text.trim());
    }
    let run: GcRun = serde_json::from_str(&text)
        .with_context(|| format!("POST {url}: not a garbage collection run"))?;
    print_gc(&run, json);
    Ok(())
}

/// `gc`, `fsck` and `repair` on a data directory no server runs on.
async fn maintain(command: Command, args: &Args) -> anyhow::Result<()> {
    use cas_server::core::gc::{FsckOptions, FsckRecord, GcOptions};
    if let Command::Gc {
        endpoint: Some(endpoint),
        token,
        dry_run,
        grace,
        json,
    } = &command
    {
        return remote_gc(endpoint, token.as_deref(), *dry_run, grace.0, *json).await;
    }
    let config = offline_config(args)?;
    let core = cas_server::open_offline(&config)
        .map_err(|e| anyhow!("{e} (is a server running on this data dir? stop it first)"))?;
    match command {
        Command::Gc {
            dry_run,
            json,
            grace,
            ..
        } => {
            let run = core
                .gc(&GcOptions::default().with_grace(grace.0), dry_run)
                .await?;
            print_gc(&run, json);
        }
        Command::Fsck { full, json } => {
            let report = core.fsck(&FsckOptions::default().with_full(full)).await?;
            FsckRecord::of(&report)
                .save(&config.data_dir)
                .with_context(|| {
                    format!("recording the result in {}", config.data_dir.display())
                })?;
            if json {
                print_json(&report);
            } else {
                report::fsck(&report);
            }
            if !report.clean {
                anyhow::bail!("fsck found {} problems", report.problems.len());
            }
        }
        Command::Repair { full, json } => {
            let report = core.repair(&FsckOptions::default().with_full(full)).await?;
            if json {
                print_json(&report);
            } else {
                report::repair(&report);
            }
        }
        Command::Token { .. }
        | Command::Key { .. }
        | Command::Index { .. }
        | Command::RebuildIndex => {
            unreachable!("not maintenance")
        }
    }
    Ok(())
}

fn parse_xorb_reads(s: &str) -> Result<XorbReads, String> {
    match s {
        "stream" => Ok(XorbReads::Stream),
        "redirect" => Ok(XorbReads::Redirect),
        _ => Err(format!("{s:?}: stream or redirect")),
    }
}

/// `index rebuild`: prints what it indexed (JSON) and the time it took.
fn rebuild_index(args: &Args) -> anyhow::Result<()> {
    let config = offline_config(args)?;
    let start = std::time::Instant::now();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let done = runtime.block_on(cas_server::rebuild_index(&config))?;
    println!("{}", serde_json::to_string(&done)?);
    eprintln!("index rebuilt in {:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// The configuration of a command that runs without serving (its data dir
/// and store).
fn offline_config(args: &Args) -> anyhow::Result<cas_server::Config> {
    let (data_dir, store) = store_config(args)?;
    Ok(cas_server::Config {
        listen: args.listen,
        data_dir,
        store,
        catch_up_every: args.catch_up_every.0,
        xorb_reads: XorbReads::Stream,
        public_url: None,
        signing_key: None,
        limits: Limits::default(),
        gc_grace: args.gc_grace.0,
        gc_interval: None,
    })
}

/// The data dir and the store from --data-dir, --store and the S3 flags.
fn store_config(args: &Args) -> anyhow::Result<(PathBuf, StoreConfig)> {
    let Some(url) = &args.store else {
        return Ok((args.data_dir.clone(), StoreConfig::DataDir));
    };
    if let Some(dir) = url.strip_prefix("file://") {
        anyhow::ensure!(!dir.is_empty(), "--store {url:?} names no directory");
        return Ok((dir.into(), StoreConfig::DataDir));
    }
    let mut s3 = S3Config::from_url(url, args.store_retry_timeout.0)
        .map_err(|e| anyhow!("--store: {e} (s3://BUCKET[/PREFIX] or file://DIR)"))?;
    s3.endpoint.clone_from(&args.s3_endpoint);
    s3.region.clone_from(&args.s3_region);
    Ok((args.data_dir.clone(), StoreConfig::S3(s3)))
}

fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    let result = match args.command.take() {
        Some(
            Command::Index {
                command: IndexCommand::Rebuild,
            }
            | Command::RebuildIndex,
        ) => rebuild_index(&args),
        Some(c @ (Command::Gc { .. } | Command::Fsck { .. } | Command::Repair { .. })) => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(maintain(c, &args))
        }
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
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .map_err(|e| anyhow!("invalid --log filter {:?}: {e}", args.log))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let nofile = cas_server::raise_nofile_limit();
    let fitting = Limits::max_connections_for(nofile);
    let max_connections = args.max_connections.unwrap_or(fitting);
    if max_connections > fitting {
        tracing::warn!(
            max_connections,
            nofile,
            "--max-connections is more than {fitting}, what the file descriptor limit leaves room for"
        );
    }
    let limits = Limits {
        max_connections,
        header_timeout: args.header_timeout.0,
        idle_timeout: args.idle_timeout.0,
        body_timeout: args.body_timeout.0,
        body_progress_bytes: args.body_progress.0,
        body_budget: args.body_budget.0,
        queue_timeout: args.queue_timeout.0,
        max_concurrent_uploads: args.max_concurrent_uploads,
    };
    let (data_dir, store) = store_config(&args)?;
    let config = cas_server::Config {
        listen: args.listen,
        data_dir: data_dir.clone(),
        store: store.clone(),
        catch_up_every: args.catch_up_every.0,
        xorb_reads: args.xorb_reads,
        public_url: args.public_url,
        signing_key: key(args.signing_key_file.as_ref())?,
        limits,
        gc_grace: args.gc_grace.0,
        gc_interval: args.gc_interval.map(|s| s.0),
    };
    let logged_limits = format!("{:?}", config.limits);
    let tokens = config.signing_key.is_some();
    let public_url_set = config.public_url.is_some();
    let server = cas_server::Server::bind(config).await?;
    let addr = server.local_addr()?;
    // One line on stdout that scripts and tests can read.
    println!("cas-server listening on http://{addr}");
    match &store {
        StoreConfig::DataDir => tracing::info!(
            data_dir = %data_dir.display(),
            "serving: xorbs and shards on the local filesystem, index in RocksDB"
        ),
        StoreConfig::S3(s3) => tracing::info!(
            bucket = s3.bucket,
            prefix = s3.prefix,
            index = %data_dir.display(),
            "serving: objects in S3 (the source of truth), index in RocksDB (a cache)"
        ),
    }
    tracing::info!(nofile, limits = logged_limits, "limits");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_sizes_and_ttls() {
        assert_eq!("1500ms".parse(), Ok(Span(Duration::from_millis(1500))));
        assert_eq!("90".parse(), Ok(Span(Duration::from_secs(90))));
        assert_eq!("2m".parse(), Ok(Span(Duration::from_secs(120))));
        for bad in [
            "",
            "0s",
            "5x",
            "-1s",
            "18446744073709551615d",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<Span>().is_err(), "{bad}");
        }
        assert_eq!(Span(Duration::from_secs(20)).to_string(), "20s");
        assert_eq!(Span(Duration::from_millis(250)).to_string(), "250ms");
        assert_eq!("64KiB".parse(), Ok(Size(65_536)));
        assert_eq!("1GiB".parse(), Ok(Size(1 << 30)));
        assert_eq!("100".parse(), Ok(Size(100)));
        assert!("1TB".parse::<Size>().is_err());
        assert_eq!(Size(1 << 30).to_string(), "1GiB");
        assert_eq!(Size(1000).to_string(), "1000");

        assert_eq!(parse_ttl("24h"), Ok(86_400));
        assert_eq!(parse_ttl("3650d"), Ok(315_360_000));
        for bad in ["3651d", "18446744073709551615", "99999999999999d", "500ms"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
