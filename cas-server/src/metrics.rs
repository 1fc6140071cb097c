//! Counters and gauges, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use crate::index::Totals;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Bytes of xorb objects served: what a cache in front saves the origin.
    pub xorb_bytes_out: AtomicU64,
    /// Bytes of files served by content URLs (the Hub API's downloads).
    pub content_bytes_out: AtomicU64,
    pub dedup_queried: AtomicU64,
    pub dedup_hits: AtomicU64,
    pub xorbs_rejected: AtomicU64,
    pub xorb_chunks_verified: AtomicU64,
    pub xorbs: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub files: AtomicU64,
    /// Xorbs found missing or corrupt (and taken out of dedup).
    pub xorbs_damaged: AtomicU64,
    /// Garbage collection runs that executed (dry runs not counted).
    pub gc_runs: AtomicU64,
    /// Xorb bytes garbage collection deleted.
    pub gc_bytes_freed: AtomicU64,
    /// Xorbs garbage collection condemned (withdrawn from dedup).
    pub gc_xorbs_condemned: AtomicU64,
    /// The last fsck of the data dir (read at start): 1 clean, 0 not;
    /// its problems; when it finished (Unix seconds, 0: never).
    pub fsck_last_clean: AtomicU64,
    pub fsck_last_problems: AtomicU64,
    pub fsck_last_finished: AtomicU64,
    /// Object store calls by operation (`store::Metered` counts them).
    store_requests: Mutex<BTreeMap<&'static str, u64>>,
    /// Object store calls that failed (not counting absent objects).
    pub store_errors: AtomicU64,
    /// Since when the object store fails, and its last error; cleared by
    /// the next call that succeeds. `/healthz` reports it.
    store_failing: Mutex<Option<(Instant, String)>>,
}

impl Metrics {
    pub fn new(totals: Totals) -> Self {
        let m = Self::default();
        m.xorbs.store(totals.xorbs, Relaxed);
        m.stored_bytes.store(totals.xorb_bytes, Relaxed);
        m.files.store(totals.files, Relaxed);
        m
    }

    /// Reports the last fsck's outcome.
    pub fn fsck(&self, record: &crate::core::gc::FsckRecord) {
        self.fsck_last_clean.store(u64::from(record.clean), Relaxed);
        self.fsck_last_problems.store(record.problems, Relaxed);
        self.fsck_last_finished.store(record.finished_unix, Relaxed);
    }

    pub fn request(&self, route: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((route, status))
            .or_default() += 1;
    }

    /// One object store call, and whether the store answered it.
    pub fn store_request(&self, op: &'static str, failure: Option<&dyn std::fmt::Display>) {
        *self
            .store_requests
            .lock()
            .expect("metrics lock")
            .entry(op)
            .or_default() += 1;
        let mut failing = self.store_failing.lock().expect("metrics lock");
        match failure {
            None => *failing = None,
            Some(e) => {
                self.store_errors.fetch_add(1, Relaxed);
                let since = failing.as_ref().map_or_else(Instant::now, |f| f.0);
                *failing = Some((since, e.to_string()));
            }
        }
    }

    /// Why the object store is degraded, if its last call failed.
    pub fn store_degraded(&self) -> Option<String> {
        let failing = self.store_failing.lock().expect("metrics lock");
        failing.as_ref().map(|(since, e)| {
            format!(
                "object store failing for {}s: {e}",
                since.elapsed().as_secs()
            )
        })
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// The Prometheus text of the counters, followed by `live` samples
    /// (name, type, help, value) read from their holders at render time.
    pub fn render(&self, live: &[(&str, &str, &str, u64)]) -> String {
        let mut s = String::new();
        s.push_str("# HELP cas_requests_total HTTP requests by route and status.\n");
        s.push_str("# TYPE cas_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().expect("metrics lock").iter() {
            writeln!(
                s,
                "cas_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            )
            .unwrap();
        }
        s.push_str("# HELP cas_store_requests_total Object store calls by operation.\n");
        s.push_str("# TYPE cas_store_requests_total counter\n");
        for (op, n) in self.store_requests.lock().expect("metrics lock").iter() {
            writeln!(s, "cas_store_requests_total{{op=\"{op}\"}} {n}").unwrap();
        }
        let scalars: [(&str, &str, &str, &AtomicU64); 19] = [
            (
                "cas_bytes_in_total",
                "counter",
                "Request body bytes received.",
                &self.bytes_in,
            ),
            (
                "cas_bytes_out_total",
                "counter",
                "Response body bytes sent.",
                &self.bytes_out,
            ),
            (
                "cas_xorb_bytes_out_total",
                "counter",
                "Xorb bytes served by GET.",
                &self.xorb_bytes_out,
            ),
            (
                "cas_content_bytes_out_total",
                "counter",
                "File bytes served by content URLs (Hub API downloads), verified as they streamed.",
                &self.content_bytes_out,
            ),
            (
                "cas_dedup_queried_chunks_total",
                "counter",
                "Chunk hashes asked about.",
                &self.dedup_queried,
            ),
            (
                "cas_dedup_hits_total",
                "counter",
                "Queried chunks that were already stored.",
                &self.dedup_hits,
            ),
            (
                "cas_xorbs_rejected_total",
                "counter",
                "Xorb uploads that failed verification.",
                &self.xorbs_rejected,
            ),
            (
                "cas_xorb_chunks_verified_total",
                "counter",
                "Chunks of uploaded xorbs decompressed and re-hashed, counted as they arrive.",
                &self.xorb_chunks_verified,
            ),
            ("cas_xorbs", "gauge", "Xorbs stored.", &self.xorbs),
            (
                "cas_stored_bytes",
                "gauge",
                "Bytes of stored xorbs.",
                &self.stored_bytes,
            ),
            ("cas_files", "gauge", "Files registered.", &self.files),
            (
                "cas_xorbs_damaged_total",
                "counter",
                "Xorbs found missing or corrupt (no longer offered for dedup).",
                &self.xorbs_damaged,
            ),
            (
                "cas_gc_runs_total",
                "counter",
                "Garbage collection runs executed (not dry runs).",
                &self.gc_runs,
            ),
            (
                "cas_gc_bytes_freed_total",
                "counter",
                "Xorb bytes deleted by garbage collection.",
                &self.gc_bytes_freed,
            ),
            (
                "cas_gc_xorbs_condemned_total",
                "counter",
                "Xorbs condemned by garbage collection (withdrawn from dedup, deleted after the grace period).",
                &self.gc_xorbs_condemned,
            ),
            (
                "cas_fsck_last_clean",
                "gauge",
                "1 if the last fsck of this data dir found no problem, else 0 (read at start; see cas_fsck_last_finished_seconds).",
                &self.fsck_last_clean,
            ),
            (
                "cas_fsck_last_problems",
                "gauge",
                "Problems the last fsck of this data dir found.",
                &self.fsck_last_problems,
            ),
            (
                "cas_fsck_last_finished_seconds",
                "gauge",
                "When the last fsck of this data dir finished, Unix seconds; 0 if it never ran.",
                &self.fsck_last_finished,
            ),
            (
                "cas_store_errors_total",
                "counter",
                "Object store calls that failed (after the store client's retries).",
                &self.store_errors,
            ),
        ];
        let loaded = scalars.map(|(name, kind, help, v)| (name, kind, help, v.load(Relaxed)));
        for (name, kind, help, v) in loaded.iter().chain(live) {
            writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}").unwrap();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new(Totals {
            xorbs: 2,
            xorb_bytes: 100,
            files: 1,
        });
        m.request("xorb_get", 206);
        m.request("xorb_get", 206);
        Metrics::add(&m.bytes_out, 42);
        let text = m.render(&[("cas_open_connections", "gauge", "Open.", 3)]);
        assert!(text.contains("cas_requests_total{route=\"xorb_get\",status=\"206\"} 2\n"));
        assert!(text.contains("cas_bytes_out_total 42\n"));
        assert!(text.contains("cas_xorbs 2\n"));
        assert!(text.contains("# TYPE cas_stored_bytes gauge\n"));
        assert!(text.contains("# TYPE cas_open_connections gauge\ncas_open_connections 3\n"));
        assert_eq!(m.store_degraded(), None);
        m.store_request("put", None);
        m.store_request("get", Some(&"connection refused"));
        assert!(m.store_degraded().unwrap().contains("connection refused"));
        m.store_request("get", None);
        assert_eq!(m.store_degraded(), None, "a success clears it");
        let text = m.render(&[]);
        assert!(text.contains("cas_store_requests_total{op=\"get\"} 2\n"));
        assert!(text.contains("cas_store_errors_total 1\n"));
    }
}
