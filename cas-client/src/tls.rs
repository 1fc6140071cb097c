//! The HTTP client every connection of the client is made with, and the
//! certificate authorities it trusts: webpki's built-in roots plus the
//! system's store, or instead of the system's store the CA files that
//! `SSL_CERT_FILE` and `SSL_CERT_DIR` name (reqwest reads them through
//! rustls-native-certs). Proxies come from the environment too
//! (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`; reqwest's defaults).

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use rustls_native_certs::{load_certs_from_paths, CertificateResult};

use crate::error::{Error, Result};

/// How long a connection (TCP, proxy, TLS) may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client builder with the connect timeout and `stall` as its read
/// timeout (a connection that delivers nothing for that long fails).
///
/// Fails first if `SSL_CERT_FILE` or `SSL_CERT_DIR` names CA certificates
/// that cannot be read: reqwest would skip them without a word, and the
/// user would see a server's certificate refused as untrusted instead of
/// the cause.
pub(crate) fn client_builder(stall: Duration) -> Result<reqwest::ClientBuilder> {
    check_ca_environment()?;
    Ok(reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(stall))
}

/// Reads what `SSL_CERT_FILE` and each directory of `SSL_CERT_DIR`
/// (`:`-separated) name, as rustls-native-certs will: every error, or no
/// certificate at all, is an error naming the variable.
fn check_ca_environment() -> Result<()> {
    if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
        let path = Path::new(&file);
        check(
            "SSL_CERT_FILE",
            path,
            load_certs_from_paths(Some(path), None),
        )?;
    }
    if let Some(dirs) = std::env::var_os("SSL_CERT_DIR") {
        for dir in std::env::split_paths(&dirs).filter(|d| d.as_os_str() != OsStr::new("")) {
            check(
                "SSL_CERT_DIR",
                &dir,
                load_certs_from_paths(None, Some(&dir)),
            )?;
        }
    }
    Ok(())
}

fn check(var: &'static str, path: &Path, loaded: CertificateResult) -> Result<()> {
    let reason = match (loaded.errors.first(), loaded.certs.is_empty()) {
        (Some(e), _) => e.to_string(),
        (None, true) => format!("no PEM certificate in '{}'", path.display()),
        (None, false) => return Ok(()),
    };
    Err(Error::Certificates { var, reason })
}

/// The certificate a TLS handshake refused, if that is what `e` is.
/// rustls reports it inside an `io::Error`, whose `source()` skips it.
pub(crate) fn certificate_error(e: &reqwest::Error) -> Option<&rustls::CertificateError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        let tls = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::InvalidCertificate(cert)) = tls {
            return Some(cert);
        }
        cur = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_ca_files_are_errors_naming_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = check(
            "SSL_CERT_FILE",
            &missing,
            load_certs_from_paths(Some(&missing), None),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("SSL_CERT_FILE"), "{err}");
        assert!(err.contains("missing.pem"), "{err}");
        assert!(err.contains("No such file"), "{err}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let err = check(
            "SSL_CERT_FILE",
            &garbage,
            load_certs_from_paths(Some(&garbage), None),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no PEM certificate in"), "{err}");

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let err = check(
            "SSL_CERT_DIR",
            &empty,
            load_certs_from_paths(None, Some(&empty)),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("SSL_CERT_DIR"), "{err}");
        assert!(err.contains("no PEM certificate in"), "{err}");
    }
}
