//! `cas-client`: a thin command-line shell over the `cas_client` library.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cas_client::lfs;
use cas_client::repo::parse_spec;
use cas_client::{
    Client, ClientConfig, FetchOptions, FetchReport, Progress, RepoTarget, RetryPolicy, Stage,
    UploadReport,
};
use cas_protocol::repo::{utc, CommitId, CommitInfo, RefName, RepoId, RepoType};
use cas_protocol::{ByteRange, FileHash};
use clap::{Args, Parser, Subcommand};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};

/// `println!` that fails (a closed pipe, a full disk) instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {
        writeln!(std::io::stdout(), $($t)*)
            .map_err(|e| anyhow::anyhow!("standard output: {e}"))?
    };
}

#[derive(Parser)]
#[command(
    version,
    about = "Content-addressed chunk store client",
    after_help = "Environment, besides each option's own (see docs/CLIENT.md):\n  \
        HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY  proxies for https/http URLs, hosts that bypass them\n  \
        SSL_CERT_FILE, SSL_CERT_DIR  CA certificates to trust instead of the system's (PEM file, directories)\n  \
        CAS_LOG  log filter, e.g. debug"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Remote {
    /// Server base URL; several nodes of one server (sharing a bucket) as
    /// URL,URL,...: a request that fails on one (connection error, 5xx)
    /// is retried on the next.
    #[arg(long, env = "CAS_ENDPOINT", default_value = "http://127.0.0.1:8080")]
    endpoint: String,
    /// Bearer token for the server.
    #[arg(long, env = "CAS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Local chunk cache directory [default: $XDG_CACHE_HOME/cas or ~/.cache/cas].
    /// Point several users at one setgid directory to share it.
    #[arg(long, env = "CAS_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Do not use the local chunk cache.
    #[arg(long)]
    no_cache: bool,
    /// Cache size cap, e.g. 500M, 20G.
    #[arg(long, env = "CAS_CACHE_SIZE", default_value = "20G", value_parser = parse_size)]
    cache_size: u64,
    /// Concurrent range requests when fetching [default: 8]; for `mirror`,
    /// concurrent requests to the upstream [default: 16].
    #[arg(long, env = "CAS_CONNECTIONS")]
    connections: Option<usize>,
    /// Concurrent xorb uploads (each holds up to 64 MiB).
    #[arg(long, env = "CAS_UPLOADS", default_value_t = 4)]
    uploads: usize,
    /// Retries of a request that failed transiently (5xx, timeout, reset).
    #[arg(long, env = "CAS_RETRIES", default_value_t = 5)]
    retries: u32,
    /// Drop a connection that delivers no bytes for this long (e.g. 30s,
    /// 2m) and retry its range, on the next node if there are several.
    #[arg(long, env = "CAS_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    stall_timeout: Duration,
}

/// The type of repositories named `ORG/NAME`.
#[derive(Args)]
struct RepoTypeArg {
    /// model or dataset (a `datasets/` or `models/` prefix says it too).
    #[arg(long = "repo-type", default_value = "model")]
    repo_type: RepoType,
}

/// Where `upload --repo` commits.
#[derive(Args)]
struct CommitArgs {
    /// Commit the upload, as one tree, to this repository (created on
    /// first use): ORG/NAME, or datasets/ORG/NAME.
    #[arg(long, value_name = "ORG/NAME")]
    repo: Option<String>,
    #[command(flatten)]
    kind: RepoTypeArg,
    /// Branch to commit to.
    #[arg(long, default_value = "main", requires = "repo")]
    branch: String,
    /// Commit message [default: "Upload PATH..."].
    #[arg(long, short, requires = "repo")]
    message: Option<String>,
    /// Commit only if the branch's head is this commit (a new branch
    /// starts at it).
    #[arg(long, requires = "repo")]
    parent: Option<String>,
    /// Commit author [default: the user name].
    #[arg(long, env = "CAS_AUTHOR")]
    author: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Upload files and directories; prints one hash per path (a directory
    /// becomes a tree). With --repo, commits them as one tree (each
    /// directory's contents and each file at its root) to a branch.
    Upload {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        commit: CommitArgs,
        /// Also print every file's hash, SHA-256 and size.
        #[arg(long, short)]
        verbose: bool,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Fetch a file (or a tree, as a directory) by hash, or a revision of
    /// a repository (ORG/NAME[@REV], REV a branch, tag, commit id or unique
    /// prefix; default main), verified; run again after an interruption,
    /// the same command finishes the job.
    Fetch {
        #[command(flatten)]
        remote: Remote,
        /// A hash, or ORG/NAME[@REV] (datasets/ORG/NAME[@REV] for a dataset).
        target: String,
        #[command(flatten)]
        kind: RepoTypeArg,
        /// Destination [default: the hash, or the repository's name, in the
        /// current directory].
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Replace existing files that differ (files already right are kept).
        #[arg(long)]
        force: bool,
        /// Fetch a tree's listing as a plain file instead of restoring it.
        #[arg(long)]
        raw: bool,
        /// Also compute every file's SHA-256 and check it against the one
        /// recorded at upload (the file hash, which commits to every byte,
        /// is always checked).
        #[arg(long, env = "CAS_VERIFY_SHA256")]
        verify_sha256: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write a file (or a byte range of it) to stdout, verified.
    Cat {
        #[command(flatten)]
        remote: Remote,
        hash: FileHash,
        /// Inclusive byte range: START-END, START- or -SUFFIX_LENGTH.
        #[arg(long, allow_hyphen_values = true)]
        range: Option<String>,
    },
    /// Show a stored file's size, SHA-256 and layout (and entries of a tree).
    Stat {
        #[command(flatten)]
        remote: Remote,
        hash: FileHash,
        #[arg(long)]
        json: bool,
    },
    /// Show the first-parent history of a revision (default main), newest
    /// first: commit id, time, author, first line of the message.
    Log {
        #[command(flatten)]
        remote: Remote,
        /// ORG/NAME[@REV].
        spec: String,
        #[command(flatten)]
        kind: RepoTypeArg,
        /// Show at most this many commits.
        #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// List the repositories the token may see.
    Repos {
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        json: bool,
    },
    /// Tag a revision (default main) of a repository, or delete a tag.
    Tag {
        #[command(flatten)]
        remote: Remote,
        /// ORG/NAME.
        spec: String,
        tag: String,
        /// A branch, tag, commit id or unique prefix.
        #[arg(default_value = "main")]
        rev: String,
        /// Delete the tag instead (what it named is freed by garbage
        /// collection unless something else references it).
        #[arg(long, short)]
        delete: bool,
        #[command(flatten)]
        kind: RepoTypeArg,
        #[arg(long)]
        json: bool,
    },
    /// Manage branches.
    Branch {
        #[command(subcommand)]
        command: BranchCommand,
    },
    /// Delete a repository: its branches, tags and record (garbage
    /// collection frees what only it referenced).
    Delete {
        #[command(flatten)]
        remote: Remote,
        /// ORG/NAME.
        spec: String,
        #[command(flatten)]
        kind: RepoTypeArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove the roots of files or trees uploaded without --repo (garbage
    /// collection frees what only they referenced).
    Rm {
        #[command(flatten)]
        remote: Remote,
        #[arg(required = true)]
        hashes: Vec<FileHash>,
    },
    /// Mirror a revision of a Hugging Face Hub repository into a repository
    /// of the store, verified, in one pass (no copy on disk): prints the
    /// commit and tree. Run again after an interruption; the same revision
    /// again changes nothing.
    Mirror {
        #[command(flatten)]
        remote: Remote,
        /// ORG/NAME upstream (datasets/ORG/NAME for a dataset).
        repo_id: String,
        #[command(flatten)]
        kind: RepoTypeArg,
        /// Upstream branch, tag or commit; also the branch committed to.
        #[arg(long, default_value = "main")]
        revision: String,
        /// The upstream Hub.
        #[arg(
            long = "from",
            env = "HF_ENDPOINT",
            default_value = "https://huggingface.co"
        )]
        from: String,
        /// Token for the upstream only [default: $HF_TOKEN, else
        /// $HF_HOME/token].
        #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
        hf_token: Option<String>,
        /// The repository to commit to [default: the upstream's ORG/NAME].
        #[arg(long = "as", value_name = "ORG/NAME")]
        target: Option<String>,
        /// Mirror only files matching a glob (`*`, `?`; `dir/` for a
        /// directory); repeatable.
        #[arg(long)]
        include: Vec<String>,
        /// Leave out files matching a glob; repeatable.
        #[arg(long)]
        exclude: Vec<String>,
        /// Commit author [default: the user name].
        #[arg(long, env = "CAS_AUTHOR")]
        author: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Git LFS custom transfer agent (git-lfs runs it; speaks its protocol
    /// on stdin and stdout): uploads send only new chunks, downloads are
    /// verified, cached and resumed. `lfs-agent install` sets git up.
    LfsAgent {
        #[command(subcommand)]
        command: Option<AgentCommand>,
        #[command(flatten)]
        args: AgentArgs,
    },
    /// Chunk and hash files locally (no server): prints file hash, SHA-256,
    /// size and path, one line per file.
    Hash {
        /// Print one JSON object per file instead.
        #[arg(long)]
        json: bool,
        /// Skip SHA-256 (printed as `-`): chunks and file hash only.
        #[arg(long)]
        no_sha256: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// How `lfs-agent` reaches the store (docs/GIT-LFS.md).
#[derive(Args)]
struct AgentArgs {
    /// The repository's Git LFS endpoint, http://SERVER/ORG/NAME.git/info/lfs
    /// [default: git's lfs.url, else .lfsconfig's].
    #[arg(long, env = "CAS_LFS_URL")]
    lfs_url: Option<String>,
    /// Server base URL [default: the LFS endpoint's server].
    #[arg(long, env = "CAS_ENDPOINT")]
    endpoint: Option<String>,
    /// Bearer token [default: the password in the LFS endpoint's URL, else
    /// what git's credential helpers hold for the server].
    #[arg(long, env = "CAS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Local chunk cache directory [default: $XDG_CACHE_HOME/cas or ~/.cache/cas].
    #[arg(long, env = "CAS_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Do not use the local chunk cache.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Make git-lfs use this agent for the server's repositories: writes
    /// lfs.customtransfer.cas.{path,args} and
    /// lfs.SERVER/.standalonetransferagent (and lfs.url when given) to the
    /// user's git config, or the current repository's with --local.
    Install {
        /// Configure the current repository only.
        #[arg(long)]
        local: bool,
        /// The repository's Git LFS endpoint, also written as lfs.url
        /// [default: the configured lfs.url].
        #[arg(long)]
        lfs_url: Option<String>,
        /// The server whose repositories use the agent [default: the LFS
        /// endpoint's server].
        #[arg(long)]
        endpoint: Option<String>,
    },
}

#[derive(Subcommand)]
enum BranchCommand {
    /// Delete a branch.
    Delete {
        #[command(flatten)]
        remote: Remote,
        /// ORG/NAME.
        spec: String,
        branch: String,
        #[command(flatten)]
        kind: RepoTypeArg,
        #[arg(long)]
        json: bool,
    },
}

/// A repository named `ORG/NAME` (no revision) for `what`.
fn repo_only(spec: &str, kind: &RepoTypeArg, what: &str) -> Result<RepoId> {
    let (repo, at) = parse_spec(spec, kind.repo_type)?;
    if at.is_some() {
        bail!("{what} takes ORG/NAME, not ORG/NAME@REV");
    }
    Ok(repo)
}

/// A duration as people write it: `30s`, `2m`, `1h 30m`; never zero.
fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (write e.g. 30s, 2m)")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?} (K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("not a size: {s:?}"))
}

/// `START-END` (inclusive), `START-` or `-SUFFIX` against a file size.
fn parse_range(s: &str, size: u64) -> Result<ByteRange> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("range {s:?} is not START-END"))?;
    let num = |x: &str| {
        x.parse::<u64>()
            .with_context(|| format!("range {s:?}: {x:?} is not a number"))
    };
    let r = match (a.is_empty(), b.is_empty()) {
        (true, false) => ByteRange {
            start: size.saturating_sub(num(b)?),
            end: size,
        },
        (false, true) => ByteRange {
            start: num(a)?,
            end: size,
        },
        (false, false) => ByteRange {
            start: num(a)?,
            end: num(b)?.saturating_add(1).min(size),
        },
        (true, true) => bail!("range {s:?} is not START-END"),
    };
    if r.start >= r.end {
        bail!("range {s:?} is outside the file's {size} bytes");
    }
    Ok(r)
}

impl Remote {
    fn client(self) -> Result<Client> {
        let config = ClientConfig {
            endpoint: self.endpoint,
            token: self.token,
            cache_dir: if self.no_cache {
                None
            } else {
                self.cache_dir.or_else(cas_client::ChunkCache::default_dir)
            },
            cache_size: self.cache_size,
            connections: self.connections.unwrap_or(8),
            upload_concurrency: self.uploads,
            retry: RetryPolicy {
                attempts: self.retries + 1,
                stall: self.stall_timeout,
                ..RetryPolicy::default()
            },
        };
        let bars: Arc<dyn Progress> = Arc::new(Bars::default());
        Ok(Client::new(config)?.with_progress(bars))
    }
}

/// Progress bars on stderr; indicatif hides them when stderr is not a
/// terminal.
#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Stage, ProgressBar>>,
}

impl Progress for Bars {
    fn start(&self, stage: Stage, total: Option<u64>) {
        let label = match stage {
            Stage::Hash => "hashing",
            Stage::Upload => "uploading",
            Stage::Download => "fetching",
        };
        let (bar, template) = match total {
            Some(t) => (
                ProgressBar::new(t),
                "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            ),
            None => (
                ProgressBar::no_length(),
                "{prefix:>10} {spinner} {bytes} {binary_bytes_per_sec}",
            ),
        };
        let style = ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> ");
        let bar = self.multi.add(bar.with_style(style).with_prefix(label));
        self.bars.lock().expect("not poisoned").insert(stage, bar);
    }

    fn advance(&self, stage: Stage, bytes: u64) {
        if let Some(b) = self.bars.lock().expect("not poisoned").get(&stage) {
            b.inc(bytes);
        }
    }

    fn finish(&self, stage: Stage) {
        if let Some(b) = self.bars.lock().expect("not poisoned").remove(&stage) {
            b.finish_and_clear();
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serializable")
}

fn rate(bytes: u64, seconds: f64) -> String {
    format!(
        "{}/s",
        HumanBytes((bytes as f64 / seconds.max(1e-9)) as u64)
    )
}

impl CommitArgs {
    /// Where `upload` commits, if it does.
    fn target(self, paths: &[PathBuf]) -> Result<Option<RepoTarget>> {
        let Some(spec) = self.repo else {
            return Ok(None);
        };
        let (repo, rev) = parse_spec(&spec, self.kind.repo_type)?;
        if rev.is_some() {
            bail!("--repo takes ORG/NAME; choose the branch with --branch");
        }
        let message = self.message.unwrap_or_else(|| {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            let m = format!("Upload {}", names.join(" "));
            m.chars().take(1000).collect()
        });
        let author = author_or_user(self.author);
        Ok(Some(RepoTarget {
            repo,
            branch: RefName::new(&self.branch)?,
            message,
            author,
            parent: self.parent.map(|p| p.parse::<CommitId>()).transpose()?,
        }))
    }
}

/// `author`, else the user's name.
fn author_or_user(author: Option<String>) -> String {
    author
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// The token `huggingface_hub` saved (`hf auth login`): `$HF_TOKEN_PATH`,
/// else `$HF_HOME/token`, else `~/.cache/huggingface/token`.
fn hf_token_file() -> Option<String> {
    let path = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("token")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/token"))
        })?;
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

/// An upload's `--json` object (`value`) with its derived ratios added.
fn upload_json(r: &UploadReport, mut value: serde_json::Value) -> serde_json::Value {
    value["dedup_ratio"] = r.dedup_ratio().into();
    value["compression_ratio"] = r.compression_ratio().into();
    value["throughput"] = r.throughput().into();
    value
}

/// What an upload left out and why, on stderr (also with `--json`).
fn print_skipped(r: &UploadReport) {
    for s in &r.skipped {
        eprintln!("skipped ({}): {}", s.reason, s.path.display());
    }
}

/// An upload's per-file lines (with `-v`) and summary.
fn print_upload(r: &UploadReport, verbose: bool) -> Result<()> {
    if verbose {
        for f in &r.files {
            out!("{}  {}  {}  {}", f.hash, f.sha256, f.size, f.path.display());
        }
    }
    let compression = if r.new_bytes == 0 {
        "nothing new".to_owned()
    } else {
        format!("compressed to {:.1}%", 100.0 * r.compression_ratio())
    };
    eprintln!(
        "{} files, {} in {:.1} s ({}); {} new ({:.1}% deduplicated), \
         sent as {} in {} xorbs ({compression})",
        r.files.len(),
        HumanBytes(r.bytes),
        r.seconds,
        rate(r.bytes, r.seconds),
        HumanBytes(r.new_bytes),
        100.0 * r.dedup_ratio(),
        HumanBytes(r.sent_bytes),
        r.xorbs,
    );
    Ok(())
}

/// A fetch's summary on stderr, after `prefix`.
fn print_fetch(r: &FetchReport, prefix: &str) {
    eprintln!(
        "{prefix}{} {} to {}: {} files, {} in {:.1} s ({}); {} from the network, {} from cache, \
         {} resumed, {} files ({}) already in place",
        if r.tree { "tree" } else { "file" },
        r.hash,
        r.path.display(),
        r.files,
        HumanBytes(r.bytes),
        r.seconds,
        rate(r.bytes, r.seconds),
        HumanBytes(r.transfer.network_bytes),
        HumanBytes(r.transfer.cache_bytes),
        HumanBytes(r.resumed_bytes),
        r.kept_files,
        HumanBytes(r.kept_bytes),
    );
}

/// `<id>  <time>  <author>  <first line>`.
fn log_line(c: &CommitInfo) -> String {
    format!(
        "{}  {}  {}  {}",
        c.id,
        utc(c.commit.time),
        c.commit.author,
        c.commit.summary()
    )
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Upload {
            remote,
            commit,
            verbose,
            json: as_json,
            paths,
        } => {
            let client = remote.client()?;
            let Some(target) = commit.target(&paths)? else {
                let r = client.upload(&paths).await?;
                print_skipped(&r);
                if as_json {
                    out!("{}", upload_json(&r, serde_json::to_value(&r)?));
                    return Ok(());
                }
                for root in &r.roots {
                    let kind = if root.tree { "tree" } else { "file" };
                    out!("{}  {kind}  {}", root.hash, root.path.display());
                }
                return print_upload(&r, verbose);
            };
            let u = client.upload_to(&paths, &target).await?;
            print_skipped(&u.report);
            if as_json {
                out!("{}", upload_json(&u.report, serde_json::to_value(&u)?));
                return Ok(());
            }
            out!("{}  tree  {}", u.commit.commit.tree, u.repo);
            out!("{}  commit  {}@{}", u.commit.id, u.repo, u.branch);
            print_upload(&u.report, verbose)?;
        }
        Command::Fetch {
            remote,
            target,
            kind,
            output,
            force,
            raw,
            verify_sha256,
            json: as_json,
        } => {
            let client = remote.client()?;
            let options = FetchOptions {
                force,
                raw,
                verify_sha256,
            };
            if let Ok(hash) = target.parse::<FileHash>() {
                let dest = output.unwrap_or_else(|| PathBuf::from(hash.to_string()));
                let r = client.fetch(hash, &dest, options).await?;
                if as_json {
                    out!("{}", json(&r));
                } else {
                    print_fetch(&r, "");
                }
                return Ok(());
            }
            let (repo, rev) = parse_spec(&target, kind.repo_type)?;
            let rev = rev.unwrap_or_else(|| RefName::main().to_string());
            let dest = output.unwrap_or_else(|| PathBuf::from(repo.name()));
            let r = client.fetch_revision(&repo, &rev, &dest, options).await?;
            if as_json {
                out!("{}", json(&r));
            } else {
                print_fetch(
                    &r.report,
                    &format!("{repo}@{rev} = commit {}: ", r.commit.id),
                );
            }
        }
        Command::Log {
            remote,
            spec,
            kind,
            limit,
            json: as_json,
        } => {
            let (repo, rev) = parse_spec(&spec, kind.repo_type)?;
            let rev = rev.unwrap_or_else(|| RefName::main().to_string());
            let commits = remote.client()?.log(&repo, &rev, limit).await?;
            if as_json {
                out!("{}", json(&commits));
            } else {
                for c in &commits {
                    out!("{}", log_line(c));
                }
            }
        }
        Command::Repos {
            remote,
            json: as_json,
        } => {
            let repos = remote.client()?.repos().await?;
            if as_json {
                out!("{}", json(&repos));
            } else {
                for r in &repos {
                    out!(
                        "{:<7}  {}  created {}",
                        r.repo.repo_type(),
                        r.repo,
                        utc(r.created)
                    );
                }
            }
        }
        Command::Tag {
            remote,
            spec,
            tag,
            rev,
            delete,
            kind,
            json: as_json,
        } => {
            let repo = repo_only(&spec, &kind, "tag")?;
            let tag = RefName::new(&tag)?;
            if delete {
                let entry = remote.client()?.delete_tag(&repo, &tag).await?;
                if as_json {
                    out!("{}", json(&entry));
                } else {
                    out!("{}  deleted tag  {repo}@{}", entry.commit, entry.name);
                }
                return Ok(());
            }
            let entry = remote.client()?.tag(&repo, &tag, &rev).await?;
            if as_json {
                out!("{}", json(&entry));
            } else {
                out!("{}  tag  {repo}@{}", entry.commit, entry.name);
            }
        }
        Command::Branch {
            command:
                BranchCommand::Delete {
                    remote,
                    spec,
                    branch,
                    kind,
                    json: as_json,
                },
        } => {
            let repo = repo_only(&spec, &kind, "branch delete")?;
            let branch = RefName::new(&branch)?;
            let entry = remote.client()?.delete_branch(&repo, &branch).await?;
            if as_json {
                out!("{}", json(&entry));
            } else {
                out!("{}  deleted branch  {repo}@{}", entry.commit, entry.name);
            }
        }
        Command::Delete {
            remote,
            spec,
            kind,
            json: as_json,
        } => {
            let repo = repo_only(&spec, &kind, "delete")?;
            let gone = remote.client()?.delete_repo(&repo).await?;
            if as_json {
                out!("{}", json(&gone));
            } else {
                for (what, refs) in [("branch", &gone.branches), ("tag", &gone.tags)] {
                    for r in refs {
                        out!("{}  deleted {what}  {repo}@{}", r.commit, r.name);
                    }
                }
                out!("deleted repository {repo}");
            }
        }
        Command::Rm { remote, hashes } => {
            let client = remote.client()?;
            for h in hashes {
                client.remove_root(h).await?;
                out!("{h}  root removed");
            }
        }
        Command::Cat {
            remote,
            hash,
            range,
        } => {
            let client = remote.client()?;
            let range = match range {
                Some(r) => Some(parse_range(&r, client.stat(hash).await?.size)?),
                None => None,
            };
            client.cat(hash, range, &mut tokio::io::stdout()).await?;
        }
        Command::Stat {
            remote,
            hash,
            json: as_json,
        } => {
            let client = remote.client()?;
            let info = client.stat(hash).await?;
            let tree = client.tree(&info).await?;
            if as_json {
                let mut v = serde_json::to_value(&info)?;
                v["tree"] = serde_json::to_value(&tree)?;
                out!("{v}");
            } else {
                out!("hash     {}", info.hash);
                out!("kind     {}", info.kind);
                out!("size     {}", info.size);
                out!("sha256   {}", info.sha256);
                out!("chunks   {} in {} terms", info.chunks, info.terms);
                if let Some(t) = tree {
                    out!("tree     {} entries", t.entries.len());
                    for e in &t.entries {
                        out!("  {}  {:o}  {:>12}  {}", e.file, e.mode, e.size, e.path);
                    }
                }
            }
        }
        Command::Mirror {
            remote,
            repo_id,
            kind,
            revision,
            from,
            hf_token,
            target,
            include,
            exclude,
            author,
            json: as_json,
        } => {
            let (upstream, rev) = parse_spec(&repo_id, kind.repo_type)?;
            if rev.is_some() {
                bail!("mirror takes ORG/NAME; choose the revision with --revision");
            }
            let target = match target {
                Some(t) => parse_spec(&t, upstream.repo_type())?.0,
                None => upstream.clone(),
            };
            let options = cas_client::MirrorOptions {
                endpoint: from,
                token: hf_token.or_else(hf_token_file),
                id: upstream.path(),
                repo_type: upstream.repo_type(),
                revision,
                target,
                include,
                exclude,
                connections: remote.connections.unwrap_or(16),
                stall: remote.stall_timeout,
                author: author_or_user(author),
            };
            let r = remote.client()?.mirror(&options).await?;
            if as_json {
                out!("{}", json(&r));
                return Ok(());
            }
            out!("{}  tree  {}", r.commit.commit.tree, r.repo);
            out!("{}  commit  {}@{}", r.commit.id, r.repo, r.branch);
            if r.unchanged {
                eprintln!(
                    "{}@{} (upstream commit {}) is already mirrored: nothing to do",
                    r.upstream, r.revision, r.upstream_commit
                );
            } else {
                eprintln!(
                    "mirrored {}@{} (upstream commit {}): {} files, {} in {:.1} s ({}); {} downloaded, {} files already stored",
                    r.upstream,
                    r.revision,
                    r.upstream_commit,
                    r.files,
                    HumanBytes(r.bytes),
                    r.seconds,
                    rate(r.bytes, r.seconds),
                    HumanBytes(r.downloaded_bytes),
                    r.reused_files,
                );
                if r.resumed_bytes > 0 {
                    eprintln!(
                        "resumed where an interrupted mirror stopped: {} not downloaded again",
                        HumanBytes(r.resumed_bytes)
                    );
                }
                if let Some(u) = &r.upload {
                    print_upload(u, false)?;
                }
            }
        }
        Command::LfsAgent {
            command: None,
            args,
        } => run_agent(args).await?,
        Command::LfsAgent {
            command:
                Some(AgentCommand::Install {
                    local,
                    lfs_url,
                    endpoint,
                }),
            ..
        } => {
            let dir = std::env::current_dir()?;
            let url = match lfs_url.clone() {
                Some(u) => Some(u),
                None => lfs::setup::configured_lfs_url(&dir)?,
            };
            let endpoint = match (endpoint, &url) {
                (Some(e), _) => e,
                (None, Some(u)) => lfs::setup::endpoint_of(u)?,
                (None, None) => bail!("no server: pass --lfs-url or --endpoint"),
            };
            let exe = std::env::current_exe().context("the path of cas-client")?;
            let scope = if local { "--local" } else { "--global" };
            for (key, value) in
                lfs::setup::install(&dir, &exe, local, &endpoint, lfs_url.as_deref())?
            {
                out!("git config {scope} {key} {value}");
            }
        }
        Command::Hash {
            json: as_json,
            no_sha256,
            paths,
        } => {
            let bars = Bars::default();
            let total = paths
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum();
            bars.start(Stage::Hash, Some(total));
            let options = cas_client::HashOptions { sha256: !no_sha256 };
            let digests = cas_client::hash_files(&paths, options, &bars);
            let mut failed = false;
            for d in digests {
                match d {
                    Ok(d) if as_json => out!("{}", json(&d)),
                    Ok(d) => out!(
                        "{}  {}  {}  {}",
                        d.file_hash,
                        d.sha256.map_or("-".into(), |s| s.to_string()),
                        d.size,
                        d.path.display()
                    ),
                    Err(e) => {
                        eprintln!("cas-client: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                bail!("some files could not be hashed");
            }
        }
    }
    Ok(())
}

/// One git-lfs session of the agent. A setup that fails (no LFS endpoint)
/// still answers, failing each transfer with why.
async fn run_agent(args: AgentArgs) -> Result<()> {
    let dir = std::env::current_dir()?;
    let input = tokio::io::BufReader::new(tokio::io::stdin());
    let found = lfs::setup::discover(&dir, args.lfs_url, args.endpoint, args.token);
    let setup = found.map_err(anyhow::Error::from).and_then(|c| {
        let config = ClientConfig {
            token: c.token,
            cache_dir: if args.no_cache {
                None
            } else {
                args.cache_dir.or_else(cas_client::ChunkCache::default_dir)
            },
            ..ClientConfig::new(c.endpoint)
        };
        Ok(lfs::transfer::StoreTransfers {
            client: Client::new(config)?,
            lfs_url: c.lfs_url,
            download_dir: lfs::setup::download_dir(&dir),
        })
    });
    match setup {
        Ok(t) => lfs::run(input, std::io::stdout(), &t).await?,
        Err(e) => {
            let t = lfs::transfer::Unconfigured(e.to_string());
            lfs::run(input, std::io::stdout(), &t).await?
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_target(false)
        .init();
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already name their cause; anyhow's chain
            // would repeat it.
            eprintln!("cas-client: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ranges_parse() {
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("20g").unwrap(), 20 << 30);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999T").is_err());
        let r = |s| parse_range(s, 100).map(|r| (r.start, r.end)).ok();
        assert_eq!(r("0-9"), Some((0, 10)));
        assert_eq!(r("90-"), Some((90, 100)));
        assert_eq!(r("-10"), Some((90, 100)));
        assert_eq!(r("50-500"), Some((50, 100)));
        assert_eq!(r("100-"), None);
        assert_eq!(r("x-1"), None);
        assert_eq!(r("-"), None);
    }
}
