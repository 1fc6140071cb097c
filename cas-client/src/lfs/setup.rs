//! Where the agent's server, repository and token come from, and
//! `lfs-agent install`, which writes the git config that makes git-lfs
//! run the agent.
//!
//! - the repository's LFS endpoint: `--lfs-url`, else git's `lfs.url`,
//!   else `lfs.url` of the committed `.lfsconfig` (git-lfs reads the same);
//! - the server: `--endpoint`, else that URL without its
//!   `/[datasets/]ORG/NAME.git/info/lfs`;
//! - the token: `--token`/`CAS_TOKEN`, else the password in the URL, else
//!   what git's credential helpers hold for the server (as for the basic
//!   transfer), else none.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The custom transfer's name in git's config.
pub const AGENT_NAME: &str = "cas";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "no Git LFS endpoint: set lfs.url (or pass --lfs-url), e.g. \
         http://SERVER/ORG/NAME.git/info/lfs"
    )]
    NoLfsUrl,
    #[error("{0:?} is not a repository's LFS endpoint (http://SERVER/ORG/NAME.git/info/lfs)")]
    BadLfsUrl(String),
    #[error("git {args}: {reason}")]
    Git { args: String, reason: String },
}

/// How the agent reaches the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// `.../ORG/NAME.git/info/lfs`, without credentials.
    pub lfs_url: String,
    /// The server's base URL.
    pub endpoint: String,
    pub token: Option<String>,
}

/// Runs git in `dir`; `Ok(None)` when it exits non-zero (a config key
/// that is not set).
fn git(dir: &Path, args: &[&str], input: Option<&str>) -> Result<Option<String>, SetupError> {
    let failed = |reason: String| SetupError::Git {
        args: args.join(" "),
        reason,
    };
    let mut child = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    let mut stdin = child.stdin.take().expect("piped");
    if let Some(text) = input {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

/// The LFS endpoint git-lfs uses in `dir`: `lfs.url` from git's config,
/// else from the work tree's `.lfsconfig`.
pub fn configured_lfs_url(dir: &Path) -> Result<Option<String>, SetupError> {
    if let Some(url) = git(dir, &["config", "--get", "lfs.url"], None)? {
        return Ok(Some(url));
    }
    let Some(top) = git(dir, &["rev-parse", "--show-toplevel"], None)? else {
        return Ok(None);
    };
    let lfsconfig = Path::new(&top).join(".lfsconfig");
    let file = lfsconfig.to_string_lossy();
    git(dir, &["config", "-f", &file, "--get", "lfs.url"], None)
}

/// Splits credentials out of a URL: (the URL without them, the password).
fn split_userinfo(url: &str) -> (String, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let password = userinfo.split_once(':').map(|(_, p)| p.to_owned());
            (format!("{scheme}://{host}{path}"), password)
        }
        None => (url.to_owned(), None),
    }
}

/// The server's base URL of a repository's LFS endpoint.
pub fn endpoint_of(lfs_url: &str) -> Result<String, SetupError> {
    let bad = || SetupError::BadLfsUrl(lfs_url.to_owned());
    let repo = lfs_url
        .trim_end_matches('/')
        .strip_suffix("/info/lfs")
        .filter(|r| r.ends_with(".git"))
        .ok_or_else(bad)?;
    let (rest, _name) = repo.rsplit_once('/').ok_or_else(bad)?;
    let (base, _org) = rest.rsplit_once('/').ok_or_else(bad)?;
    let base = base.strip_suffix("/datasets").unwrap_or(base);
    if !base.contains("://") || base.ends_with(':') || base.ends_with('/') {
        return Err(bad());
    }
    Ok(base.to_owned())
}

/// The password git's credential helpers hold for `url`'s host.
fn credential(dir: &Path, url: &str) -> Result<Option<String>, SetupError> {
    let Some((protocol, rest)) = url.split_once("://") else {
        return Ok(None);
    };
    let host = rest.split('/').next().unwrap_or_default();
    let query = format!("protocol={protocol}\nhost={host}\n\n");
    let Some(answer) = git(dir, &["credential", "fill"], Some(&query))? else {
        return Ok(None);
    };
    Ok(answer
        .lines()
        .find_map(|l| l.strip_prefix("password="))
        .map(str::to_owned))
}

/// The agent's configuration for the repository at `dir`.
pub fn discover(
    dir: &Path,
    lfs_url: Option<String>,
    endpoint: Option<String>,
    token: Option<String>,
) -> Result<AgentConfig, SetupError> {
    let url = match lfs_url {
        Some(u) => u,
        None => configured_lfs_url(dir)?.ok_or(SetupError::NoLfsUrl)?,
    };
    let (lfs_url, password) = split_userinfo(&url);
    let endpoint = match endpoint {
        Some(e) => e,
        None => endpoint_of(&lfs_url)?,
    };
    let token = match token.or(password) {
        Some(t) => Some(t),
        None => credential(dir, &endpoint)?,
    };
    Ok(AgentConfig {
        lfs_url,
        endpoint,
        token,
    })
}

/// git-lfs's temporary directory of the repository at `dir` (downloads
/// written there move into its store by a rename), else the system's.
pub fn download_dir(dir: &Path) -> PathBuf {
    match git(dir, &["rev-parse", "--absolute-git-dir"], None) {
        Ok(Some(git_dir)) => Path::new(&git_dir).join("lfs/tmp/cas-agent"),
        _ => std::env::temp_dir().join("cas-lfs-agent"),
    }
}

/// Writes the git config that runs the agent at `exe` for every Git LFS
/// endpoint under `endpoint`: in the repository at `dir` (`local`) or
/// the user's, with `lfs.url` too when given. Returns the settings.
pub fn install(
    dir: &Path,
    exe: &Path,
    local: bool,
    endpoint: &str,
    lfs_url: Option<&str>,
) -> Result<Vec<(String, String)>, SetupError> {
    let mut settings = vec![
        (
            format!("lfs.customtransfer.{AGENT_NAME}.path"),
            exe.to_string_lossy().into_owned(),
        ),
        (
            format!("lfs.customtransfer.{AGENT_NAME}.args"),
            "lfs-agent".to_owned(),
        ),
        // Only for this server: other remotes keep their own transfers.
        (
            format!(
                "lfs.{}/.standalonetransferagent",
                endpoint.trim_end_matches('/')
            ),
            AGENT_NAME.to_owned(),
        ),
    ];
    if let Some(url) = lfs_url {
        settings.push(("lfs.url".to_owned(), url.to_owned()));
    }
    let scope = if local { "--local" } else { "--global" };
    for (key, value) in &settings {
        let args = ["config", scope, key.as_str(), value.as_str()];
        git(dir, &args, None)?.ok_or_else(|| SetupError::Git {
            args: args.join(" "),
            reason: if local {
                "failed (is this a git repository?)".into()
            } else {
                "failed".into()
            },
        })?;
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_credentials_come_out_of_lfs_urls() {
        let e = |u: &str| endpoint_of(u).ok();
        assert_eq!(
            e("http://127.0.0.1:8080/org/m.git/info/lfs").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            e("https://cas.example.com/datasets/org/d.git/info/lfs/").as_deref(),
            Some("https://cas.example.com")
        );
        assert_eq!(
            e("https://h/prefix/org/m.git/info/lfs").as_deref(),
            Some("https://h/prefix")
        );
        for bad in [
            "http://h/org/m/info/lfs",
            "http://h/m.git/info/lfs",
            "http://h/org/m.git",
            "org/m.git/info/lfs",
            "",
        ] {
            assert_eq!(e(bad), None, "{bad}");
        }
        assert_eq!(
            split_userinfo("http://git:cas1.x@h:80/org/m.git/info/lfs"),
            (
                "http://h:80/org/m.git/info/lfs".into(),
                Some("cas1.x".into())
            )
        );
        assert_eq!(
            split_userinfo("http://h/a@b/info/lfs"),
            ("http://h/a@b/info/lfs".into(), None)
        );
    }
}
