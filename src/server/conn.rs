//! One client connection: its socket wrapped so that idle, slow-header and
//! slow-reader clients are cut off, and its requests marked busy while they run.
//!
//! A connection is *idle* from its start and from the end of each response until the
//! next request is dispatched. While idle, it must send the first byte of a request
//! within the idle timeout and the rest of the request head within the header timeout
//! of that byte. While busy, reading waits as long as the handler likes (a body that
//! stalls is the handler's to cut, see `crate::body`). Writing must move at least the
//! send minimum per send timeout of waiting on the client, busy or not, so a reader
//! that takes a byte now and then is cut like one that takes nothing.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::metrics::{Metrics, ReasonLabels};
use crate::stall::{self, Stall};

/// Watches a connection's socket (through a duplicate of its descriptor) for the
/// client closing it. `POLLRDHUP` reports the client's end of stream as soon as it
/// arrives, even behind body bytes the server has not read yet (a peek would see the
/// bytes, not the end); a reset reports as an error.
pub fn watch_peer(tcp: &tokio::net::TcpStream) -> std::io::Result<crate::body::Peer> {
    use rustix::event::{PollFd, PollFlags};
    let fd = rustix::io::fcntl_dupfd_cloexec(tcp, 0)?;
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    Ok(crate::body::Peer::new(move || {
        let mut fds = [PollFd::new(&fd, PollFlags::RDHUP)];
        match rustix::event::poll(&mut fds, Some(&now)) {
            Ok(_) => fds[0]
                .revents()
                .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR),
            Err(_) => false,
        }
    }))
}

/// The timeouts of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From idle to the first byte of a request.
    pub idle: Duration,
    /// From a request's first byte to the end of its head.
    pub header: Duration,
    /// Waiting this long on a client that takes fewer than `send_min_bytes` fails the
    /// write.
    pub send: Duration,
    /// See `send`.
    pub send_min_bytes: u64,
}

/// What the connection's service tells its socket, and what the accept loop reads to
/// choose a connection to close when the slots run out (`slots`).
pub struct ConnState {
    /// Requests being handled (HTTP/1.1 handles one at a time).
    busy: AtomicUsize,
    /// Responses ended so far: each starts an idle period.
    periods: AtomicU64,
    /// When the current idle period began, in milliseconds since `origin`.
    idle_since: AtomicU64,
    /// One more than the idle period in which the next request's head began (its
    /// first byte arrived); 0 before any.
    head_period: AtomicU64,
    origin: Instant,
    /// Set once the accept loop has chosen this connection to make room.
    evicted: AtomicBool,
    evict: Notify,
}

/// What a connection is doing, as far as choosing one to close goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// A request is being handled: never closed to make room.
    Busy,
    /// Between requests, having served at least one, since this instant.
    KeptAlive(Instant),
    /// Has not sent a whole request since this instant: a new connection, or a
    /// request head still arriving.
    Incomplete(Instant),
}

impl ConnState {
    /// A connection opened now, idle.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            busy: AtomicUsize::new(0),
            periods: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_period: AtomicU64::new(0),
            origin: Instant::now(),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        })
    }

    /// A request was dispatched; it ends when the returned guard drops (with the
    /// response body, or with the handler if the client went away).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Whether a request is being handled.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    /// What the connection is doing now.
    pub fn activity(&self) -> Activity {
        if self.is_busy() {
            return Activity::Busy;
        }
        let period = self.periods.load(Ordering::Relaxed);
        let since = self.origin + Duration::from_millis(self.idle_since.load(Ordering::Relaxed));
        let head_began = self.head_period.load(Ordering::Relaxed) == period + 1;
        if period > 0 && !head_began {
            Activity::KeptAlive(since)
        } else {
            Activity::Incomplete(since)
        }
    }

    /// Notes that the next request's head began in the current idle period.
    fn head_began(&self) {
        let period = self.periods.load(Ordering::Relaxed);
        self.head_period.store(period + 1, Ordering::Relaxed);
    }

    /// Asks the connection to close to make room for another; false if it was asked
    /// already.
    pub fn evict(&self) -> bool {
        if self.evicted.swap(true, Ordering::Relaxed) {
            return false;
        }
        // A permit is kept if the connection is not waiting yet.
        self.evict.notify_one();
        true
    }

    /// Whether the connection has been asked to close.
    #[cfg(test)]
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Resolves once the connection has been asked to close.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

/// A request in progress on a connection.
pub struct Busy(Arc<ConnState>);

impl Drop for Busy {
    fn drop(&mut self) {
        let state = &self.0;
        let now = state.origin.elapsed().as_millis() as u64;
        state.idle_since.store(now, Ordering::Relaxed);
        state.periods.fetch_add(1, Ordering::Relaxed);
        state.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which read timeout applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadTimeout {
    /// No request has begun since the connection became idle.
    Idle,
    /// A request head has begun.
    Header,
}

/// A socket with the connection's timeouts, counting the bytes that cross it.
pub struct Timed<T> {
    inner: T,
    state: Arc<ConnState>,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    /// The idle period the read deadline belongs to.
    idle_period: Option<u64>,
    /// When the first byte of the next request arrived in this idle period.
    first_byte: Option<Instant>,
    read_timer: Option<Pin<Box<Sleep>>>,
    sending: Stall,
}

impl<T> Timed<T> {
    /// Wraps `inner`, whose service marks its requests in `state`.
    pub fn new(inner: T, state: Arc<ConnState>, timeouts: Timeouts, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            state,
            metrics,
            idle_period: None,
            first_byte: None,
            read_timer: None,
            sending: Stall::new(timeouts.send, timeouts.send_min_bytes),
            timeouts,
        }
    }

    fn timed_out(&self, reason: &'static str) {
        self.metrics
            .connections_timed_out
            .get_or_create(&ReasonLabels { reason })
            .inc();
        tracing::debug!(reason, "closing a connection on a timeout");
    }

    /// The read deadline now, if the connection is idle, and which timeout it is.
    fn read_deadline(&mut self) -> Option<(Instant, ReadTimeout)> {
        if self.state.busy.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let period = self.state.periods.load(Ordering::Relaxed);
        if self.idle_period != Some(period) {
            self.idle_period = Some(period);
            self.first_byte = None;
        }
        Some(match self.first_byte {
            Some(first) => (first + self.timeouts.header, ReadTimeout::Header),
            None => {
                let since = self.state.idle_since.load(Ordering::Relaxed);
                let start = self.state.origin + Duration::from_millis(since);
                (start + self.timeouts.idle, ReadTimeout::Idle)
            }
        })
    }

    /// Applies the send timeout to the outcome of a write-side poll; `moved` says how
    /// many bytes a successful one moved.
    fn progress<R>(
        &mut self,
        polled: Poll<io::Result<R>>,
        moved: impl FnOnce(&R) -> u64,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(Ok(r)) => {
                let n = moved(&r);
                self.metrics.bytes_sent.inc_by(n);
                self.sending.progressed(n);
                Poll::Ready(Ok(r))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if !self.sending.waiting(cx) => Poll::Pending,
            Poll::Pending => {
                self.timed_out("send");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client is not reading",
                )))
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Timed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                this.metrics.bytes_received.inc_by(n as u64);
                if n > 0 && this.read_deadline().is_some() && this.first_byte.is_none() {
                    this.first_byte = Some(Instant::now());
                    this.state.head_began();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some((deadline, which)) = this.read_deadline() else {
                    return Poll::Pending;
                };
                if !stall::expired(&mut this.read_timer, deadline, cx) {
                    return Poll::Pending;
                }
                Poll::Ready(match which {
                    // An idle connection just ends, as if the client had closed it.
                    ReadTimeout::Idle => {
                        this.timed_out("idle");
                        Ok(())
                    }
                    ReadTimeout::Header => {
                        this.timed_out("header");
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the request head took too long",
                        ))
                    }
                })
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Timed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(polled, |n| *n as u64, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(polled, |n| *n as u64, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(polled, |_| 0, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(polled, |_| 0, cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_client_that_closes_is_seen_gone_behind_unread_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let peer = watch_peer(&server).unwrap();
        assert!(!peer.gone());
        // Bytes the server has not read yet, then the client's end.
        client.write_all(&[7u8; 10_000]).await.unwrap();
        assert!(!peer.gone());
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !peer.gone() {
            assert!(Instant::now() < deadline, "the end was not seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(60),
        header: Duration::from_secs(10),
        send: Duration::from_secs(30),
        send_min_bytes: 1000,
    };

    fn pair() -> (
        Timed<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<ConnState>,
        Arc<Metrics>,
    ) {
        let (server, client) = tokio::io::duplex(64);
        let state = ConnState::new();
        let metrics = Arc::new(Metrics::new());
        (
            Timed::new(server, state.clone(), T, metrics.clone()),
            client,
            state,
            metrics,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_after_the_idle_timeout() {
        let (mut server, _client, _, metrics) = pair();
        let started = Instant::now();
        let mut buf = [0u8; 8];
        assert_eq!(
            server.read(&mut buf).await.unwrap(),
            0,
            "an idle timeout reads as EOF"
        );
        assert_eq!(started.elapsed(), T.idle);
        assert!(metrics.render().contains("reason=\"idle\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_is_cut_after_the_header_timeout_from_its_first_byte() {
        let (mut server, mut client, _, _) = pair();
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let mut n = 0;
            loop {
                match server.read(&mut buf).await {
                    Ok(0) => return Ok(n),
                    Ok(k) => n += k,
                    Err(e) => return Err(e),
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(50)).await;
        // One byte a second: the head would take 30 s; the server stops reading it
        // (and the client's writes fail) after 10.
        for _ in 0..30 {
            if client.write_all(b"G").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let err = reading.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_waits_and_idles_again_after_its_response() {
        let (mut server, mut client, state, _) = pair();
        let busy = state.begin();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(3600), server.read(&mut buf)).await;
        assert!(read.is_err(), "no timeout while a request runs");
        client.write_all(b"x").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(busy);
        let started = Instant::now();
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        assert_eq!(
            started.elapsed(),
            T.idle,
            "the idle period starts when the response ends"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_a_byte_now_and_then_is_cut_too() {
        let (mut server, mut client, state, _) = pair();
        let _busy = state.begin();
        let reader = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            while client.read(&mut byte).await.unwrap_or(0) > 0 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let started = Instant::now();
        let err = server.write_all(&[0u8; 1 << 20]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Some waits end in a byte read, but 1000 bytes take far more than 30 s.
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            started.elapsed()
        );
        drop(server);
        reader.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn requests_ending_together_still_start_a_new_idle_period() {
        let (mut server, mut client, state, metrics) = pair();
        // A request head begins, then its request runs and ends at once, twice, in
        // the same instant: the idle period after it is the idle timeout, not what is
        // left of a header timeout.
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(server.read(&mut buf).await.unwrap(), 3);
        drop(state.begin());
        drop(state.begin());
        let started = Instant::now();
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        assert_eq!(started.elapsed(), T.idle);
        assert!(metrics.render().contains("reason=\"idle\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_after_the_send_timeout() {
        let (mut server, _client, state, metrics) = pair();
        let _busy = state.begin();
        let err = server.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let text = metrics.render();
        assert!(text.contains("reason=\"send\"} 1"), "{text}");
        assert!(text.contains("cachet_http_sent_bytes_total 64"), "{text}");
    }
}
