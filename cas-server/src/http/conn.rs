//! Connections: how many may be open, and how long each may go without a
//! request.
//!
//! Each accepted socket is wrapped in a [`Guarded`] stream that knows its
//! connection's state: idle (no request on it), reading a head (bytes of
//! the next request arrived, the head is not complete), or busy (a request
//! is being served). Idle and head reads have deadlines (`idle_timeout`
//! from the end of the last response, `header_timeout` from the first byte
//! of a head); a request body has its own bound (http::body), and a write
//! that stalls (a client that does not read its answer) fails after the
//! write timeout. hyper's own header timeout is not used: it starts when a
//! connection goes idle, which would make the two timeouts one.
//!
//! [`Connections`] caps the number of open connections below the file
//! descriptor limit. At the cap, the connection idle the longest (no
//! request in flight, its last answer flushed) is closed to make room, as
//! nginx does with keep-alive connections when it runs out: a flood of
//! idle or slow-header sockets cannot lock out `/healthz` or real clients,
//! and no request in flight is ever cut. When every connection is busy,
//! new ones wait in the listen backlog until one ends or goes idle.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Every open connection, under a cap.
#[derive(Debug)]
pub struct Connections {
    permits: Arc<Semaphore>,
    live: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Signalled when a request ends: its connection may now be evicted.
    went_idle: Notify,
    pub(crate) evicted: AtomicU64,
    pub(crate) idle_timeouts: AtomicU64,
    pub(crate) header_timeouts: AtomicU64,
    pub(crate) write_timeouts: AtomicU64,
}

/// One connection's state, shared by its stream, its requests and the
/// registry.
#[derive(Debug)]
pub struct Conn {
    state: Mutex<State>,
    /// The connection task, woken when its state changes from outside.
    waker: AtomicWaker,
    registry: Arc<Connections>,
}

#[derive(Debug)]
struct State {
    /// Evicted: the next read fails and the connection ends.
    closing: bool,
    requests: u32,
    idle_since: Instant,
    /// When the first byte of the head being read arrived.
    head_since: Option<Instant>,
    /// Everything written so far has been flushed to the socket.
    flushed: bool,
}

/// Which deadline a read waits under.
#[derive(Debug, Clone, Copy)]
enum Wait {
    Idle,
    Head,
}

impl Connections {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max.max(1))),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            went_idle: Notify::new(),
            evicted: AtomicU64::new(0),
            idle_timeouts: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            write_timeouts: AtomicU64::new(0),
        })
    }

    /// Open connections (a gauge for /metrics).
    pub fn open(&self) -> usize {
        self.live.lock().expect("connections lock").len()
    }

    /// A slot for one more connection: free, made by evicting the
    /// connection idle the longest, or waited for.
    pub async fn admit(self: &Arc<Self>) -> Slot {
        loop {
            if let Ok(p) = self.permits.clone().try_acquire_owned() {
                return self.register(p);
            }
            let went_idle = self.went_idle.notified();
            if self.evict_idlest() {
                // The evicted connection's task ends at its next read.
                let p = self.permits.clone().acquire_owned().await;
                return self.register(p.expect("never closed"));
            }
            tokio::select! {
                p = self.permits.clone().acquire_owned() => {
                    return self.register(p.expect("never closed"));
                }
                () = went_idle => {}
            }
        }
    }

    fn register(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        let id = self.next_id.fetch_add(1, Relaxed);
        let conn = Arc::new(Conn {
            state: Mutex::new(State {
                closing: false,
                requests: 0,
                idle_since: Instant::now(),
                head_since: None,
                flushed: true,
            }),
            waker: AtomicWaker::new(),
            registry: self.clone(),
        });
        self.live
            .lock()
            .expect("connections lock")
            .insert(id, conn.clone());
        Slot {
            id,
            conn,
            _permit: permit,
        }
    }

    /// Closes the connection idle the longest, if any is idle.
    fn evict_idlest(&self) -> bool {
        let live = self.live.lock().expect("connections lock");
        let idlest = live
            .values()
            .filter_map(|c| {
                let s = c.state.lock().expect("connection lock");
                let evictable = !s.closing && s.requests == 0 && s.flushed;
                evictable.then_some((s.idle_since, c))
            })
            .min_by_key(|(since, _)| *since);
        let Some((_, conn)) = idlest else {
            return false;
        };
        conn.state.lock().expect("connection lock").closing = true;
        conn.waker.wake();
        self.evicted.fetch_add(1, Relaxed);
        true
    }
}

/// A connection's place under the cap; dropping it frees the place.
pub struct Slot {
    id: u64,
    conn: Arc<Conn>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    pub fn conn(&self) -> Arc<Conn> {
        self.conn.clone()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let registry = &self.conn.registry;
        registry
            .live
            .lock()
            .expect("connections lock")
            .remove(&self.id);
    }
}

impl Conn {
    /// Marks a request in flight until the guard drops (hold it until the
    /// response is sent); `None` if the connection is being closed.
    pub fn begin_request(self: &Arc<Self>) -> Option<RequestGuard> {
        let mut s = self.state.lock().expect("connection lock");
        if s.closing {
            return None;
        }
        s.requests += 1;
        s.head_since = None;
        Some(RequestGuard(self.clone()))
    }

    /// The deadline of a read now, or `Err` if the connection is evicted.
    fn read_deadline(&self, limits: &Timeouts) -> Result<Option<(Instant, Wait)>, ()> {
        let s = self.state.lock().expect("connection lock");
        if s.closing {
            return Err(());
        }
        Ok(match (s.requests, s.head_since) {
            (1.., _) => None,
            (0, Some(t)) => Some((t + limits.header, Wait::Head)),
            (0, None) => Some((s.idle_since + limits.idle, Wait::Idle)),
        })
    }

    fn bytes_arrived(&self) {
        let mut s = self.state.lock().expect("connection lock");
        if s.requests == 0 && s.head_since.is_none() {
            s.head_since = Some(Instant::now());
        }
    }

    fn set_flushed(&self, flushed: bool) {
        self.state.lock().expect("connection lock").flushed = flushed;
    }
}

/// A request in flight on a connection.
pub struct RequestGuard(Arc<Conn>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().expect("connection lock");
        s.requests -= 1;
        if s.requests == 0 {
            s.idle_since = Instant::now();
            // The response's last bytes may still be in hyper's buffer.
            s.flushed = false;
        }
        drop(s);
        // The connection's read deadline changed; the accept loop may be
        // waiting for a connection to evict.
        self.0.waker.wake();
        self.0.registry.went_idle.notify_one();
    }
}

/// The deadlines of [`Guarded`].
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
    /// How long a write may wait for the client to take bytes.
    pub write: Duration,
}

/// A connection's socket with its idle, header and write deadlines.
pub struct Guarded<S> {
    io: S,
    conn: Arc<Conn>,
    timeouts: Timeouts,
    timer: Pin<Box<Sleep>>,
    /// Armed while a write waits for the client.
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl<S> Guarded<S> {
    pub fn new(io: S, conn: Arc<Conn>, timeouts: Timeouts) -> Self {
        Self {
            io,
            conn,
            timeouts,
            timer: Box::pin(tokio::time::sleep(timeouts.idle)),
            write_timer: None,
        }
    }

    /// Bounds how long a write stays pending: `r` is the inner write's
    /// result; a write that waited `timeouts.write` without progress fails.
    fn bound_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.write_timer = None;
            return r;
        }
        let write = self.timeouts.write;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(write)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.conn.registry.write_timeouts.fetch_add(1, Relaxed);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took no bytes of its answer for {write:?}"),
        )))
    }

    /// Pending until the current deadline passes, then the error to end
    /// the connection with.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.conn.waker.register(cx.waker());
        let (deadline, wait) = match self.conn.read_deadline(&self.timeouts) {
            Err(()) => return Poll::Ready(evicted()),
            Ok(None) => return Poll::Pending,
            Ok(Some(d)) => d,
        };
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let (counter, what) = match wait {
            Wait::Idle => (&self.conn.registry.idle_timeouts, "idle connection"),
            Wait::Head => (&self.conn.registry.header_timeouts, "request head"),
        };
        counter.fetch_add(1, Relaxed);
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} timed out"),
        ))
    }
}

fn evicted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "idle connection closed to make room for a new one",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.read_deadline(&this.timeouts).is_err() {
            return Poll::Ready(Err(evicted()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.conn.bytes_arrived();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_deadline(cx).map(Err),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.conn.set_flushed(false);
        }
        this.bound_write(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.conn.set_flushed(false);
        }
        this.bound_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            this.conn.set_flushed(true);
        }
        this.bound_write(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Timeouts = Timeouts {
        header: Duration::from_secs(5),
        idle: Duration::from_secs(60),
        write: Duration::from_secs(30),
    };

    /// An idle connection ends after the idle timeout; once a head starts
    /// the header timeout counts from its first byte; a request in flight
    /// has no read deadline here.
    #[tokio::test(start_paused = true)]
    async fn idle_and_header_deadlines() {
        let registry = Connections::new(4);
        let slot = registry.admit().await;
        let (client, server) = tokio::io::duplex(64);
        let mut io = Guarded::new(server, slot.conn(), T);
        let mut buf = [0u8; 8];
        let start = Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), T.idle);

        let slot = registry.admit().await;
        let (mut client2, server) = tokio::io::duplex(64);
        let mut io = Guarded::new(server, slot.conn(), T);
        tokio::time::advance(Duration::from_secs(50)).await;
        client2.write_all(b"G").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        let head = Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(head.elapsed(), T.header, "from the head's first byte");
        assert_eq!(registry.idle_timeouts.load(Relaxed), 1);
        assert_eq!(registry.header_timeouts.load(Relaxed), 1);

        let slot = registry.admit().await;
        let (mut client3, server) = tokio::io::duplex(64);
        let conn = slot.conn();
        let mut io = Guarded::new(server, conn.clone(), T);
        let guard = conn.begin_request().unwrap();
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let n = io.read(&mut buf).await;
            (n.map_err(|e| e.kind()), io)
        });
        tokio::time::advance(Duration::from_secs(3600)).await;
        client3.write_all(b"body").await.unwrap();
        let (n, io) = read.await.unwrap();
        assert_eq!(n, Ok(4), "no deadline while a request is in flight");
        drop(guard);
        drop((client, io));
    }

    /// At the cap, a new connection evicts the one idle the longest, never
    /// one with a request in flight; with none idle it waits.
    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_idlest_connection_makes_room() {
        let registry = Connections::new(2);
        let old = registry.admit().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        let busy = registry.admit().await;
        let _request = busy.conn().begin_request().unwrap();
        let (_c, server) = tokio::io::duplex(64);
        let mut old_io = Guarded::new(server, old.conn(), T);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let r = old_io.read(&mut buf).await.unwrap_err().kind();
            drop(old);
            r
        });
        let third = registry.admit().await;
        assert_eq!(task.await.unwrap(), io::ErrorKind::ConnectionAborted);
        assert_eq!(registry.evicted.load(Relaxed), 1);
        assert!(third.conn().begin_request().is_some());
        // Both remaining connections are busy: a fourth waits.
        let fourth = registry.admit();
        tokio::pin!(fourth);
        assert!(futures_util::FutureExt::now_or_never(&mut fourth).is_none());
        assert_eq!(registry.open(), 2);
        drop(third);
        let _fourth = fourth.await;
        assert_eq!(registry.open(), 2);
    }

    /// A write the client does not take fails after the write timeout; one
    /// that makes progress in time does not.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_fails() {
        let registry = Connections::new(1);
        let slot = registry.admit().await;
        let (mut client, server) = tokio::io::duplex(4);
        let mut io = Guarded::new(server, slot.conn(), T);
        let start = Instant::now();
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            let mut buf = [0u8; 4];
            client.read_exact(&mut buf).await.unwrap();
            client
        });
        io.write_all(b"12345678").await.unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(20),
            "waited for the reader"
        );
        let _client = reader.await.unwrap();
        let err = tokio::time::timeout(T.write * 2, io.write_all(b"more"))
            .await
            .expect("the stalled write ends")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(20) + T.write);
        assert_eq!(registry.write_timeouts.load(Relaxed), 1);
    }

    /// A connection whose last answer is not flushed yet is not idle.
    #[tokio::test]
    async fn an_unflushed_answer_is_not_evicted() {
        let registry = Connections::new(1);
        let slot = registry.admit().await;
        let conn = slot.conn();
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Guarded::new(server, conn.clone(), T);
        let request = conn.begin_request().unwrap();
        io.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        drop(request);
        assert!(!registry.evict_idlest());
        io.flush().await.unwrap();
        assert!(registry.evict_idlest());
        let mut buf = [0u8; 64];
        assert_eq!(client.read(&mut buf).await.unwrap(), 17);
        drop(slot);
    }
}
