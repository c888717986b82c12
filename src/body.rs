//! Request bodies as they arrive from clients, guarded against clients that stall, and
//! the clients themselves: whether one is still connected.
//!
//! A client that trickles an upload (one byte a second, say) would otherwise hold an
//! ingest slot and its memory for as long as it likes. The guard (`crate::stall`)
//! counts only the time the server spends waiting for the client, not time the server
//! itself is busy (a body is not read while its chunks are being stored), and it asks
//! for a minimum of bytes in that time, so a trickle is cut as surely as silence.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};

use crate::stall::Stall;

/// Whether the client of a request is still connected. An HTTP server notices a client
/// that goes away only when it next reads or writes; a long upload whose body has
/// arrived whole (a compression bomb, say) is neither, so its ingest asks this between
/// buffers and stops when the client has gone.
#[derive(Clone)]
pub struct Peer {
    gone: Arc<dyn Fn() -> bool + Send + Sync>,
    address: Option<std::net::IpAddr>,
}

impl Peer {
    /// A peer that has gone when `gone` says so.
    pub fn new(gone: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self {
            gone: Arc::new(gone),
            address: None,
        }
    }

    /// The same peer, connected from `address`.
    pub fn at(self, address: std::net::IpAddr) -> Self {
        Self {
            address: Some(address),
            ..self
        }
    }

    /// A peer that never goes away (for uploads not from a connection).
    pub fn always() -> Self {
        Self::new(|| false)
    }

    /// Whether the client has closed its connection.
    pub fn gone(&self) -> bool {
        (self.gone)()
    }

    /// The address the connection comes from, if it comes from one.
    pub fn address(&self) -> Option<std::net::IpAddr> {
        self.address
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Peer")
    }
}

/// How slow a body may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Waiting this long for fewer than `min_bytes` makes the body stalled.
    pub stall_timeout: Duration,
    /// Bytes a client must send per `stall_timeout` of waiting (0: any progress will do).
    pub min_bytes: u64,
}

impl BodyLimits {
    /// How slow an upload body may be, from the ingest settings.
    pub fn of(ingest: &crate::config::IngestConfig) -> Self {
        Self {
            stall_timeout: std::time::Duration::from_secs(ingest.body_stall_secs),
            min_bytes: ingest.body_min_bytes,
        }
    }
}

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The client sent too little for too long.
    #[error("the client sent fewer than {min_bytes} bytes in {secs} s of waiting")]
    Stalled {
        /// The stall timeout, in seconds.
        secs: u64,
        /// The bytes it should have sent in that time.
        min_bytes: u64,
    },
    /// The connection failed or the body was malformed.
    #[error("{0}")]
    Broken(String),
}

/// A body stream cut off with `BodyError::Stalled` when the client stalls.
pub struct Guarded<S> {
    inner: S,
    limits: BodyLimits,
    stall: Stall,
    done: bool,
}

/// Guards `body` with `limits`.
pub fn guard<S>(body: S, limits: BodyLimits) -> Guarded<S> {
    Guarded {
        inner: body,
        stall: Stall::new(limits.stall_timeout, limits.min_bytes),
        limits,
        done: false,
    }
}

impl<S, E> Stream for Guarded<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match this.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(data))) => {
                this.stall.progressed(data.len() as u64);
                Poll::Ready(Some(Ok(data)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(BodyError::Broken(e.to_string()))))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending if !this.stall.waiting(cx) => Poll::Pending,
            Poll::Pending => {
                this.done = true;
                Poll::Ready(Some(Err(BodyError::Stalled {
                    secs: this.limits.stall_timeout.as_secs(),
                    min_bytes: this.limits.min_bytes,
                })))
            }
        }
    }
}

/// How long a refused upload's body is read on (see `Kept`): long enough for the
/// bytes in flight on any network a cache serves, short enough that a client that
/// goes on sending holds nothing for long.
pub const LINGER: Duration = Duration::from_secs(5);

/// A body read through a handle its handler keeps (`Kept::handle`), so that what the
/// client still sends after the server has refused the upload can be read and thrown
/// away (`Kept::linger`).
///
/// An upload refused mid-body (a full disk, a quota, a bomb, a bad NAR) is answered
/// before the client has sent all of it. Closing a connection with unread bytes makes
/// the kernel reset it, and a client still sending (curl, and so Nix, reads the answer
/// only once it has sent, or sees it arrive) may lose the answer to the reset: it
/// reports a broken connection instead of the 507 or 413. Reading on for a moment, as
/// nginx's lingering close does, lets the answer through.
pub struct Kept<S> {
    inner: Arc<std::sync::Mutex<KeptState<S>>>,
}

struct KeptState<S> {
    body: S,
    /// Bytes read so far.
    read: u64,
    /// Whether the body has ended (or failed).
    done: bool,
}

impl<S> Kept<S> {
    /// Keeps `body`.
    pub fn new(body: S) -> Self {
        Self {
            inner: Arc::new(std::sync::Mutex::new(KeptState {
                body,
                read: 0,
                done: false,
            })),
        }
    }

    /// Another handle on the same body.
    pub fn handle(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Stream<Item = Result<Bytes, BodyError>> + Unpin> Kept<S> {
    /// Reads and throws away what is left of a body the handler did not read to its
    /// end, for at most `limit`. Nothing when nothing was read (the client may be
    /// waiting for `100 Continue` and sending nothing) or the body has ended.
    pub async fn linger(self, limit: Duration) {
        let drain = futures::stream::poll_fn(|cx| {
            let mut state = self.inner.lock().expect("never poisoned");
            if state.done || state.read == 0 {
                return Poll::Ready(None);
            }
            match state.body.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(_))) => Poll::Ready(Some(())),
                Poll::Ready(_) => {
                    state.done = true;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            }
        });
        let _ = tokio::time::timeout(limit, drain.for_each(|()| async {})).await;
    }
}

impl<S: Stream<Item = Result<Bytes, BodyError>> + Unpin> Stream for Kept<S> {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self.inner.lock().expect("never poisoned");
        let polled = state.body.poll_next_unpin(cx);
        match &polled {
            Poll::Ready(Some(Ok(data))) => state.read += data.len() as u64,
            Poll::Ready(_) => state.done = true,
            Poll::Pending => {}
        }
        polled
    }
}

/// Why a small body was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectError {
    /// It was larger than the limit.
    #[error("request body is larger than {0} bytes")]
    TooLarge(u64),
    /// The client stalled, or the connection failed.
    #[error(transparent)]
    Body(#[from] BodyError),
}

/// Reads a whole body of at most `limit` bytes.
pub async fn collect<S>(mut body: S, limit: u64) -> Result<Bytes, CollectError>
where
    S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
{
    let mut out = BytesMut::new();
    while let Some(data) = body.next().await {
        let data = data?;
        if (out.len() + data.len()) as u64 > limit {
            return Err(CollectError::TooLarge(limit));
        }
        out.extend_from_slice(&data);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    const LIMITS: BodyLimits = BodyLimits {
        stall_timeout: Duration::from_secs(10),
        min_bytes: 100,
    };

    /// A body that sends `piece` bytes every `every`, `count` times.
    fn trickle(
        piece: usize,
        every: Duration,
        count: usize,
    ) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        Box::pin(futures::stream::unfold(0, move |n| async move {
            if n == count {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok(Bytes::from(vec![0u8; piece])), n + 1))
        }))
    }

    async fn read_all<S: Stream<Item = Result<Bytes, E>> + Unpin, E: std::fmt::Display>(
        body: S,
    ) -> Result<u64, BodyError> {
        let mut guarded = guard(body, LIMITS);
        let mut n = 0;
        while let Some(d) = guarded.next().await {
            n += d?.len() as u64;
        }
        Ok(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_body_is_read_on_after_its_reader_stops_and_only_then() {
        let body = || {
            let pieces = trickle(100, Duration::from_millis(10), 50);
            Kept::new(pieces.map(|r| r.map_err(BodyError::Broken)))
        };
        // The reader takes two pieces and stops; the rest is read within the limit.
        let mut kept = body();
        let rest = kept.handle();
        kept.next().await.unwrap().unwrap();
        kept.next().await.unwrap().unwrap();
        drop(kept);
        let started = Instant::now();
        rest.linger(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(480));
        // Nothing read (a client waiting for `100 Continue`): no wait at all.
        let untouched = body();
        let started = Instant::now();
        untouched.handle().linger(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        // A body that never ends is left after the limit.
        let endless = Kept::new(
            trickle(100, Duration::from_secs(1), usize::MAX).map(|r| r.map_err(BodyError::Broken)),
        );
        let mut reader = endless.handle();
        reader.next().await.unwrap().unwrap();
        let started = Instant::now();
        endless.linger(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_body_passes_however_long_it_takes() {
        // 100 bytes every 9 s: slow, but enough per stall window.
        let n = read_all(trickle(100, Duration::from_secs(9), 20))
            .await
            .unwrap();
        assert_eq!(n, 2000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_cut_like_silence() {
        let started = Instant::now();
        let err = read_all(trickle(1, Duration::from_secs(1), 1000))
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::Stalled { secs: 10, .. }), "{err}");
        assert_eq!(started.elapsed().as_secs(), 10);
        let err = read_all(futures::stream::pending::<Result<Bytes, String>>())
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::Stalled { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_server_is_busy_does_not_count() {
        // 20 bytes a second meets the minimum of 100 bytes per 10 s of waiting.
        let mut guarded = guard(trickle(20, Duration::from_secs(1), 30), LIMITS);
        let mut n = 0;
        while let Some(d) = guarded.next().await {
            n += d.unwrap().len();
            // The server takes its time between reads; the client waits, unblamed.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        assert_eq!(n, 600);
    }

    #[tokio::test]
    async fn collect_stops_at_the_limit() {
        let body = || guard(trickle(10, Duration::ZERO, 5), LIMITS);
        assert_eq!(collect(body(), 50).await.unwrap().len(), 50);
        assert_eq!(
            collect(body(), 49).await.unwrap_err(),
            CollectError::TooLarge(49)
        );
        let broken = futures::stream::iter([Ok(Bytes::new()), Err("reset".to_string())]);
        let err = collect(guard(broken, LIMITS), 10).await.unwrap_err();
        assert_eq!(err, CollectError::Body(BodyError::Broken("reset".into())));
    }
}
