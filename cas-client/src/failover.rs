//! Several server nodes behind one client: `--endpoint A,B,C` (or
//! `CAS_ENDPOINT`). Requests go to the current node; a request that fails
//! there transiently (connection refused or reset, timeout, 5xx) moves the
//! client to the next node, and its retry (and every later request) goes
//! there. Nodes that share a bucket answer alike, so an upload or a fetch
//! in progress carries on: URLs a node handed out (xorb reads under
//! `/v1/xorbs/...`) are rebased onto the current node too.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The nodes and which one is in use.
#[derive(Debug)]
pub(crate) struct Endpoints {
    /// Base URLs without a trailing `/`.
    list: Vec<String>,
    current: AtomicUsize,
}

impl Endpoints {
    /// `A,B,C`: base URLs separated by commas (whitespace around them is
    /// ignored); at least one.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let list: Vec<String> = s
            .split(',')
            .map(|e| e.trim().trim_end_matches('/').to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if list.is_empty() {
            return Err("no endpoint given".into());
        }
        Ok(Self {
            list,
            current: AtomicUsize::new(0),
        })
    }

    pub(crate) fn all(&self) -> &[String] {
        &self.list
    }

    /// The node requests go to now.
    pub(crate) fn current(&self) -> &str {
        &self.list[self.current.load(Ordering::Relaxed) % self.list.len()]
    }

    /// Which of the nodes `url` lies under.
    fn index_of(&self, url: &str) -> Option<usize> {
        self.list.iter().position(|e| {
            url.strip_prefix(e.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')
            })
        })
    }

    /// `url` moved onto the current node if it lies under one of the
    /// nodes; other URLs (a CDN's) are left alone.
    pub(crate) fn rebase(&self, url: &str) -> String {
        match self.index_of(url) {
            Some(i) => format!("{}{}", self.current(), &url[self.list[i].len()..]),
            None => url.to_owned(),
        }
    }

    /// A request to `url` failed transiently: if it went to the current
    /// node, the next one becomes current (concurrent failures of one
    /// node move the client once).
    pub(crate) fn failed(&self, url: &str) {
        if self.list.len() < 2 {
            return;
        }
        let Some(i) = self.index_of(url) else {
            return;
        };
        let next = (i + 1) % self.list.len();
        let moved = self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if moved {
            tracing::warn!("{} failed; moving to {}", self.list[i], self.list[next]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_to_the_next_node_and_rebases() {
        let e = Endpoints::parse("http://a:1/, http://b:2,http://c:3").unwrap();
        assert_eq!(e.all().len(), 3);
        assert_eq!(e.current(), "http://a:1");
        assert_eq!(e.rebase("http://a:1/v1/xorbs/x"), "http://a:1/v1/xorbs/x");
        e.failed("http://a:1/v1/xorbs/x");
        assert_eq!(e.current(), "http://b:2");
        assert_eq!(e.rebase("http://a:1/v1/xorbs/x"), "http://b:2/v1/xorbs/x");
        assert_eq!(e.rebase("http://cdn/v1/xorbs/x"), "http://cdn/v1/xorbs/x");
        // A late failure of the old node does not skip the new one.
        e.failed("http://a:1/v1/dedup");
        assert_eq!(e.current(), "http://b:2");
        e.failed("http://b:2/v1/dedup");
        e.failed("http://c:3/v1/dedup");
        assert_eq!(e.current(), "http://a:1", "round and round");
        // A prefix that is not a whole host:port is not a node.
        assert_eq!(e.rebase("http://a:10/x"), "http://a:10/x");
        assert!(Endpoints::parse(" , ").is_err());
        let one = Endpoints::parse("http://only").unwrap();
        one.failed("http://only/x");
        assert_eq!(one.current(), "http://only");
    }
}
