//! The protocol's state machine, free of I/O: `init` first (once), then
//! transfers of the initialised direction, until `terminate`. Each line
//! in gives one [`Step`] out; the driver ([`super::run`]) does the I/O.

use super::wire::{self, Download, ErrorObject, Event, InitAnswer, Operation, Request, Upload};

/// The error codes the agent answers with (HTTP's, for familiarity).
pub mod code {
    /// A request that is malformed or out of place.
    pub const BAD_REQUEST: u16 = 400;
    /// The token may not do this.
    pub const DENIED: u16 = 403;
    /// The object is not stored.
    pub const NOT_FOUND: u16 = 404;
    /// The object's bytes are not what its id says.
    pub const MISMATCH: u16 = 409;
    /// The store or the network failed.
    pub const FAILED: u16 = 502;
}

/// What to do after one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this line (an init answer, or a failed transfer's `complete`).
    Answer(String),
    Upload(Upload),
    Download(Download),
    /// `terminate`: stop, successfully.
    Stop,
    /// A line that names no object and is no `init`: nothing can answer
    /// it, so the agent stops with this error (git-lfs reports the exit).
    Fatal(String),
}

#[derive(Debug, Default)]
pub struct Session {
    operation: Option<Operation>,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// The direction `init` chose, once it has.
    pub fn operation(&self) -> Option<Operation> {
        self.operation
    }

    pub fn next(&mut self, line: &str) -> Step {
        let request = match wire::parse(line) {
            Ok(r) => r,
            Err(e) => {
                let error = ErrorObject {
                    code: code::BAD_REQUEST,
                    message: e.reason,
                };
                return match (e.oid, self.operation) {
                    (Some(oid), Some(_)) => Step::Answer(wire::line(&Event::failed(oid, error))),
                    (_, None) => init_error(error),
                    (None, Some(_)) => Step::Fatal(format!("unusable request: {}", error.message)),
                };
            }
        };
        match (request, self.operation) {
            (Request::Init { operation }, None) => {
                self.operation = Some(operation);
                Step::Answer(wire::line(&InitAnswer { error: None }))
            }
            (Request::Init { .. }, Some(_)) => Step::Fatal("a second init in one session".into()),
            (Request::Terminate, _) => Step::Stop,
            (_, None) => init_error(ErrorObject {
                code: code::BAD_REQUEST,
                message: "a transfer before init".into(),
            }),
            (Request::Upload(u), Some(Operation::Upload)) => Step::Upload(u),
            (Request::Download(d), Some(Operation::Download)) => Step::Download(d),
            (Request::Upload(Upload { oid, .. }) | Request::Download(Download { oid, .. }), _) => {
                Step::Answer(wire::line(&Event::failed(
                    oid.to_string(),
                    ErrorObject {
                        code: code::BAD_REQUEST,
                        message: "a transfer of the other direction than init's".into(),
                    },
                )))
            }
        }
    }
}

fn init_error(error: ErrorObject) -> Step {
    Step::Answer(wire::line(&InitAnswer { error: Some(error) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OID: &str = "22ab5f63670800cc7be06dbed816012b0dc411e774754c7579467d2536a9cf3e";

    fn answer(step: Step) -> serde_json::Value {
        match step {
            Step::Answer(l) => {
                assert!(l.ends_with('\n') && l.matches('\n').count() == 1, "{l:?}");
                serde_json::from_str(&l).unwrap()
            }
            other => panic!("not an answer: {other:?}"),
        }
    }

    #[test]
    fn a_session_inits_transfers_and_terminates() {
        let mut s = Session::new();
        let a = answer(s.next(r#"{"event":"init","operation":"download","concurrent":false}"#));
        assert_eq!(a, serde_json::json!({}));
        assert_eq!(s.operation(), Some(Operation::Download));
        let d = format!(r#"{{"event":"download","oid":"{OID}","size":5}}"#);
        assert!(matches!(
            s.next(&d),
            Step::Download(Download { size: 5, .. })
        ));
        // An upload in a download session fails alone.
        let u = format!(r#"{{"event":"upload","oid":"{OID}","size":5,"path":"/x"}}"#);
        let a = answer(s.next(&u));
        assert_eq!(a["event"], "complete");
        assert_eq!(a["oid"], OID);
        assert_eq!(a["error"]["code"], 400);
        // A bad request for an object fails that object; the session goes on.
        let bad = format!(r#"{{"event":"download","oid":"{OID}"}}"#);
        assert_eq!(answer(s.next(&bad))["error"]["code"], 400);
        assert!(matches!(s.next(&d), Step::Download(_)));
        assert_eq!(s.next(r#"{"event":"terminate"}"#), Step::Stop);
    }

    #[test]
    fn junk_before_init_is_an_init_error_and_after_it_fatal() {
        let mut s = Session::new();
        for junk in ["", "{", "garbage", r#"{"event":"upload"}"#, "[1,2]"] {
            let a = answer(s.next(junk));
            assert_eq!(a["error"]["code"], 400, "{junk:?}: {a}");
            assert!(a["error"]["message"].as_str().unwrap().len() > 5);
        }
        let d = format!(r#"{{"event":"download","oid":"{OID}","size":5}}"#);
        let a = answer(s.next(&d));
        assert_eq!(a["error"]["message"], "a transfer before init");
        assert_eq!(s.operation(), None);
        answer(s.next(r#"{"event":"init","operation":"upload"}"#));
        for junk in [
            "",
            "}{",
            "\u{1}",
            r#"{"event":"init","operation":"upload"}"#,
        ] {
            assert!(matches!(s.next(junk), Step::Fatal(_)), "{junk:?}");
        }
    }
}
