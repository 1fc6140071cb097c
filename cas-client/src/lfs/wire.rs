//! The messages of git-lfs's custom transfer protocol
//! (git-lfs `docs/custom-transfers.md`): one JSON object per line on the
//! agent's stdin (requests) and stdout (answers and progress).

use std::path::PathBuf;

use cas_protocol::Sha256;
use serde::{Deserialize, Serialize};

/// Longest request line accepted: requests carry an id, a size, a path and
/// an action, far below this.
pub const MAX_LINE: usize = 64 * 1024;

/// Which way a session transfers, fixed by its `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Upload,
    Download,
}

/// A request from git-lfs. Fields the agent does not use (`concurrent`,
/// the batch API's `action`, null in standalone mode) are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Request {
    Init { operation: Operation },
    Upload(Upload),
    Download(Download),
    Terminate,
}

/// Upload the file at `path`, whose bytes hash to `oid`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Upload {
    pub oid: Sha256,
    pub size: u64,
    pub path: PathBuf,
}

/// Download object `oid` to a file of the agent's choosing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Download {
    pub oid: Sha256,
    pub size: u64,
}

/// A line that is not a request. `oid` is the object it names, when it
/// names one: its transfer can then be failed alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct WireError {
    pub oid: Option<String>,
    pub reason: String,
}

/// Parses one request line (without its line feed).
pub fn parse(line: &str) -> Result<Request, WireError> {
    if line.len() > MAX_LINE {
        return Err(WireError {
            oid: None,
            reason: format!("request line of {} bytes (at most {MAX_LINE})", line.len()),
        });
    }
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| WireError {
        oid: None,
        reason: format!("not a JSON request: {e}"),
    })?;
    let oid = value.get("oid").and_then(|o| o.as_str()).map(str::to_owned);
    serde_json::from_value(value).map_err(|e| WireError {
        oid,
        reason: format!("not a valid request: {e}"),
    })
}

/// A failure as the protocol carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorObject {
    pub code: u16,
    pub message: String,
}

/// The answer to `init`: `{}`, or `{"error": ...}`.
#[derive(Debug, Serialize)]
pub struct InitAnswer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorObject>,
}

/// What the agent sends while and after transferring one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    Progress {
        oid: String,
        #[serde(rename = "bytesSoFar")]
        bytes_so_far: u64,
        #[serde(rename = "bytesSinceLast")]
        bytes_since_last: u64,
    },
    /// The end of one transfer: `path` (a download's file, handed over to
    /// git-lfs) or `error`.
    Complete {
        oid: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<ErrorObject>,
    },
}

impl Event {
    pub fn failed(oid: impl Into<String>, error: ErrorObject) -> Self {
        Event::Complete {
            oid: oid.into(),
            path: None,
            error: Some(error),
        }
    }
}

/// One message as its line, line feed included.
pub fn line<T: Serialize>(message: &T) -> String {
    let mut s = serde_json::to_string(message).expect("protocol messages serialize");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const OID: &str = "bf3e3e2af9366a3b704ae0c31de5afa64193ebabffde2091936ad2e7510bc03a";

    #[test]
    fn requests_of_the_documented_shapes_parse() {
        assert_eq!(
            parse(
                r#"{ "event":"init", "operation":"download", "remote":"origin", "concurrent": true, "concurrenttransfers": 3 }"#
            ),
            Ok(Request::Init {
                operation: Operation::Download
            })
        );
        let up = format!(
            r#"{{ "event":"upload", "oid": "{OID}", "size": 346232, "path": "/path/to/file.png", "action": {{ "href": "nfs://server/path", "header": {{ "key": "value" }} }} }}"#
        );
        assert_eq!(
            parse(&up),
            Ok(Request::Upload(Upload {
                oid: OID.parse().unwrap(),
                size: 346232,
                path: "/path/to/file.png".into()
            }))
        );
        let down = format!(r#"{{"event":"download","oid":"{OID}","size":21245,"action":null}}"#);
        assert_eq!(
            parse(&down),
            Ok(Request::Download(Download {
                oid: OID.parse().unwrap(),
                size: 21245
            }))
        );
        assert_eq!(parse(r#"{"event":"terminate"}"#), Ok(Request::Terminate));
    }

    #[test]
    fn junk_lines_are_errors_naming_their_object_when_they_can() {
        let junk = [
            "",
            " ",
            "{",
            "null",
            "[]",
            "42",
            "\"init\"",
            "{}",
            r#"{"event":"init"}"#,
            r#"{"event":"init","operation":"sideways"}"#,
            r#"{"event":"INIT","operation":"upload"}"#,
            r#"{"event":"explode"}"#,
            r#"{"event":7}"#,
            "{\"event\":\"terminate\"}{\"event\":\"terminate\"}",
            "\u{feff}{\"event\":\"terminate\"}",
            "\0\0\0",
        ];
        for line in junk {
            let e = parse(line).unwrap_err();
            assert_eq!(e.oid, None, "{line:?}");
            assert!(!e.reason.is_empty());
        }
        let long = format!(r#"{{"event":"terminate","x":"{}"}}"#, "a".repeat(MAX_LINE));
        assert!(parse(&long).unwrap_err().reason.contains("at most"));
        // Bad fields of a request for an object: the error names it.
        for line in [
            format!(r#"{{"event":"upload","oid":"{OID}","size":1}}"#),
            format!(r#"{{"event":"upload","oid":"{OID}","size":-1,"path":"/x"}}"#),
            format!(r#"{{"event":"download","oid":"{OID}","size":"big"}}"#),
            format!(r#"{{"event":"download","oid":"{OID}","size":18446744073709551616}}"#),
        ] {
            assert_eq!(
                parse(&line).unwrap_err().oid.as_deref(),
                Some(OID),
                "{line}"
            );
        }
        // An id that is not a SHA-256 is refused, and still named.
        for oid in ["xyz", &OID.to_uppercase(), &OID[1..], "../../etc/passwd"] {
            let line = format!(r#"{{"event":"download","oid":"{oid}","size":1}}"#);
            assert_eq!(
                parse(&line).unwrap_err().oid.as_deref(),
                Some(oid),
                "{line}"
            );
        }
    }

    #[test]
    fn answers_are_single_lines_of_the_documented_shapes() {
        assert_eq!(line(&InitAnswer { error: None }), "{}\n");
        let e = ErrorObject {
            code: 404,
            message: "not\nstored".into(),
        };
        assert_eq!(
            line(&InitAnswer {
                error: Some(e.clone())
            }),
            "{\"error\":{\"code\":404,\"message\":\"not\\nstored\"}}\n"
        );
        assert_eq!(
            line(&Event::Progress {
                oid: OID.into(),
                bytes_so_far: 10,
                bytes_since_last: 4
            }),
            format!(
                "{{\"event\":\"progress\",\"oid\":\"{OID}\",\"bytesSoFar\":10,\"bytesSinceLast\":4}}\n"
            )
        );
        assert_eq!(
            line(&Event::Complete {
                oid: OID.into(),
                path: Some("/tmp/o".into()),
                error: None
            }),
            format!("{{\"event\":\"complete\",\"oid\":\"{OID}\",\"path\":\"/tmp/o\"}}\n")
        );
        assert_eq!(
            line(&Event::failed(OID, e)),
            format!("{{\"event\":\"complete\",\"oid\":\"{OID}\",\"error\":{{\"code\":404,\"message\":\"not\\nstored\"}}}}\n")
        );
    }
}
