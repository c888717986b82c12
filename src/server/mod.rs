//! Starting and stopping the server, and the connections: accepted up to a cap (with a
//! clear refusal beyond it), each with TCP_NODELAY, a large send buffer and the
//! timeouts of `conn`, served by hyper over the router, and drained on SIGTERM.

mod background;
pub mod client;
mod conn;
mod slots;
pub mod tls;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::{Config, StorageBackend};
use crate::http::ClientAddr;
use client::TrustedProxies;
use conn::{ConnState, Timed, Timeouts};
use slots::{Limits, Slots};

/// File descriptors kept for the index, pack reads, refusals (`MAX_REFUSING`) and
/// connections closing (`MAX_CLOSING`) beyond those the connections take.
const RESERVED_FILES: u64 = 256;
/// Descriptors a connection may take: its socket, the duplicate that watches for the
/// client leaving, and a pack being read for it.
const FILES_PER_CONNECTION: u64 = 3;
/// Refusals written at once; beyond that, connections over the cap are just closed.
const MAX_REFUSING: usize = 64;
/// Connections asked to close to make room and not closed yet, beyond which newcomers
/// are refused: each holds its descriptors until its task has dropped it, which takes
/// a moment, or a response's time for one that began a request meanwhile.
const MAX_CLOSING: usize = 32;
/// How long the accept loop waits for connections asked to close to let go of their
/// descriptors before it refuses a newcomer: a flood of connects is slowed down
/// rather than answered with refusals that would hit real clients too.
const SETTLE: Duration = Duration::from_millis(200);

/// Raises the soft limit on open files to the hard limit (a server started by a shell
/// or an init system often gets 1,024) and returns the limit now in force.
pub fn raise_open_files() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    /// Linux's own ceiling (`fs.nr_open`) by default, for an unlimited hard limit.
    const CEILING: u64 = 1 << 20;
    let limit = getrlimit(Resource::Nofile);
    let Some(current) = limit.current else {
        return u64::MAX;
    };
    let maximum = limit.maximum.unwrap_or(CEILING);
    if current < maximum {
        let raised = Rlimit {
            current: Some(maximum),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return maximum,
            Err(e) => {
                tracing::warn!(error = %e, current, maximum, "could not raise the open-file limit")
            }
        }
    }
    current
}

/// The connection cap that the open-file limit allows `listeners` listeners (each keeps
/// its own refusals and closing connections).
pub fn connection_cap(configured: usize, open_files: u64, listeners: u64) -> usize {
    let allowed = open_files.saturating_sub(RESERVED_FILES * listeners) / FILES_PER_CONNECTION;
    configured
        .min(usize::try_from(allowed).unwrap_or(usize::MAX))
        .max(1)
}

/// Opens the data directory, listens, and serves until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let open_files = raise_open_files();
    let opened = App::open(config).await?;
    let app = opened.app;
    // A store that cannot be written and read is said at start, not at the first push.
    if let Err(e) = app.packs.check().await {
        return Err(match app.config.storage.backend {
            StorageBackend::S3 => crate::store::s3::unusable(&app.config.storage, &e),
            StorageBackend::Local => anyhow::anyhow!("the storage is not usable: {e}"),
        });
    }
    let bind = |addr: std::net::SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))
    };
    let listener = bind(listen).await?;
    let admin_listener = match app.config.server.admin_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let addr = listener.local_addr()?;
    let tls = match (&app.config.tls.cert_file, &app.config.tls.key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::Tls::new(cert, key)?)),
        _ => None,
    };
    // Installed with or without TLS: SIGHUP's default action would stop the server
    // (`systemctl reload`, say).
    tokio::spawn(on_hangup(tls.clone()));
    tokio::spawn(background::write_accesses(app.clone()));
    tokio::spawn(background::scheduled_gc(app.clone()));
    tokio::spawn(background::watch_space(app.clone()));
    tokio::spawn(background::follow_changes(app.clone()));
    announce(&app, addr, tls.is_some(), opened.admin_token.is_some());
    let s = &app.config.server;
    // The admin listener's connections come out of the same open-file limit: short of
    // descriptors, it takes at most half of what there is.
    let admin_share = admin_listener
        .as_ref()
        .map_or(0, |_| s.admin_max_connections);
    let listeners = if admin_listener.is_some() { 2 } else { 1 };
    let cap = connection_cap(s.max_connections + admin_share, open_files, listeners);
    let (main_cap, admin_cap) = if cap >= s.max_connections + admin_share {
        (s.max_connections, admin_share)
    } else {
        tracing::warn!(
            open_files,
            max_connections = cap,
            "the open-file limit allows fewer connections than server.max_connections"
        );
        let admin = admin_share.min(cap / 2);
        ((cap - admin).max(1), admin.max(1))
    };
    let stop = CancellationToken::new();
    let main = serve(
        listener,
        app.clone(),
        Limits {
            cap: main_cap,
            per_address: s.max_connections_per_address,
            max_closing: MAX_CLOSING,
        },
        tls.as_ref().map(|t| t.acceptor()),
        stop.clone(),
    );
    let admin = async {
        if let Some(listener) = admin_listener {
            tracing::info!(addr = %listener.local_addr()?, "admin listener");
            let limits = Limits {
                cap: admin_cap,
                per_address: s.admin_max_connections,
                max_closing: MAX_CLOSING,
            };
            let acceptor = tls.as_ref().map(|t| t.acceptor());
            serve(listener, app.clone(), limits, acceptor, stop.clone()).await;
        }
        Ok::<_, anyhow::Error>(())
    };
    let signal = async {
        shutdown_signal().await;
        stop.cancel();
    };
    let ((), admin, ()) = tokio::join!(main, admin, signal);
    admin?;
    app.accesses.flush(app.index.as_ref()).await?;
    app.index.flush().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Serves connections from `listener` (over TLS with `tls`) within `limits`, until
/// `stop`; then stops accepting and waits (up to the configured grace) for requests
/// in flight.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let service = crate::http::Service::new(app.clone());
    let s = &app.config.server;
    let timeouts = Timeouts {
        idle: Duration::from_secs(s.idle_timeout_secs),
        header: Duration::from_secs(s.header_timeout_secs),
        send: Duration::from_secs(s.send_timeout_secs),
        send_min_bytes: s.send_min_bytes,
    };
    let slots = Slots::new(limits);
    let proxies = Arc::new(TrustedProxies::new(
        s.trusted_proxies.clone(),
        s.forwarded_header,
    ));
    let gate = client::Gate::new(s.max_connections_per_address);
    let refusing = Arc::new(AtomicUsize::new(0));
    loop {
        let (tcp, peer_addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors (or a connection reset before it was
                    // accepted): wait a little rather than spin, and go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Connections asked to close a moment ago still hold their descriptors.
        slots.closing_settled(SETTLE).await;
        let address = peer_addr.ip();
        let trusted = proxies.contains(address);
        let state = ConnState::new();
        let slot = match slots.admit(address, !trusted, state.clone()) {
            Ok((slot, evicted)) => {
                if let Some(kind) = evicted {
                    app.metrics.evicted(kind.reason());
                    // Lets the connection asked to close run and let go of its slot.
                    tokio::task::yield_now().await;
                }
                slot
            }
            Err(refusal) => {
                app.metrics.refused(refusal.reason());
                if refusing.fetch_add(1, Ordering::Relaxed) < MAX_REFUSING {
                    let refusing = refusing.clone();
                    tokio::spawn(async move {
                        refuse(tcp).await;
                        refusing.fetch_sub(1, Ordering::Relaxed);
                    });
                } else {
                    refusing.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
        };
        configure(&tcp, app.config.serve.send_buffer_bytes);
        let peer = match conn::watch_peer(&tcp) {
            Ok(peer) => peer.at(address),
            Err(e) => {
                // Out of descriptors: this connection would not get far either.
                tracing::warn!(error = %e, "could not watch a connection");
                continue;
            }
        };
        app.metrics.connections_open.inc();
        let connection = Connection {
            service: service.clone(),
            peer,
            state,
            timeouts,
            metrics: app.metrics.clone(),
            stop: stop.clone(),
            tls: tls.is_some(),
            address,
            forwarding: trusted.then(|| (proxies.clone(), gate.clone())),
        };
        let (metrics, tls) = (app.metrics.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => connection.serve(tcp).await,
                Some(tls) => connection.serve_tls(tls, tcp).await,
            }
            metrics.connections_open.dec();
        });
    }
    drop(listener);
    tracing::info!("shutting down: waiting for requests in flight");
    let grace = Duration::from_secs(app.config.server.shutdown_grace_secs);
    if tokio::time::timeout(grace, slots.drained()).await.is_err() {
        tracing::warn!("requests still in flight after the grace period; stopping anyway");
    }
}

/// What serving one connection needs.
struct Connection {
    service: crate::http::Service,
    peer: crate::body::Peer,
    state: Arc<ConnState>,
    timeouts: Timeouts,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
    tls: bool,
    /// The peer's address.
    address: std::net::IpAddr,
    /// For a trusted proxy: whose headers name the client, and the limit of requests
    /// per client.
    forwarding: Option<(Arc<TrustedProxies>, Arc<client::Gate>)>,
}

impl Connection {
    /// The TLS handshake, then HTTP over it. The handshake counts as the request head:
    /// it gets the same time, and a connection closed to make room ends it.
    async fn serve_tls(self, tls: tokio_rustls::TlsAcceptor, tcp: TcpStream) {
        let handshake = tokio::time::timeout(self.timeouts.header, tls.accept(tcp));
        tokio::select! {
            done = handshake => match done {
                Ok(Ok(stream)) => self.serve(stream).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            },
            () = self.state.evicted() => {}
            () = self.stop.cancelled() => {}
        }
    }

    /// Serves HTTP/1.1 on `io` (TCP, or TLS over it) until the client or the server
    /// ends it, or it is closed to make room (at once between requests, after its
    /// response otherwise).
    async fn serve<T>(self, io: T)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let state = self.state.clone();
        let io = TokioIo::new(Timed::new(
            io,
            state.clone(),
            self.timeouts,
            self.metrics.clone(),
        ));
        let (handler, peer, tls) = (self.service, self.peer, self.tls);
        let (address, forwarding) = (self.address, self.forwarding);
        let per_request =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let busy = state.begin();
                // A request is the peer's (whose address `Peer` holds) unless a trusted
                // proxy forwards it.
                let pass = forwarding.as_ref().map(|(proxies, gate)| {
                    let client = proxies.client(address, req.headers());
                    req.extensions_mut().insert(ClientAddr(client));
                    gate.enter(client)
                });
                req.extensions_mut().insert(peer.clone());
                if tls {
                    req.extensions_mut().insert(crate::http::OverTls);
                }
                // A forwarded client over its limit of requests in flight is answered
                // by the service, which counts and logs it like any request.
                if let Some(None) = &pass {
                    req.extensions_mut().insert(crate::http::TooBusy);
                }
                let response = handler.call(req);
                async move {
                    // The request counts as busy until its body is sent or dropped.
                    let response = response.await.map(|inner| Tracked {
                        inner,
                        _busy: busy,
                        _pass: pass.flatten(),
                    });
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // The idle and header timeouts are the connection's own (see `conn`).
            .header_read_timeout(None)
            .serve_connection(io, per_request);
        let mut connection = std::pin::pin!(connection);
        let mut closing = false;
        let ended = loop {
            tokio::select! {
                ended = connection.as_mut() => break ended,
                () = self.state.evicted(), if !closing => {
                    // Between requests, or before a whole one: close now.
                    if !self.state.is_busy() {
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = self.stop.cancelled(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// Reads the certificate again on every SIGHUP.
async fn on_hangup(tls: Option<Arc<tls::Tls>>) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: the certificate will not be reloaded");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let Some(tls) = &tls else {
            tracing::info!("SIGHUP: nothing to reload (the server does not terminate TLS)");
            continue;
        };
        match tls.reload() {
            Ok(()) => tracing::info!("reloaded the TLS certificate"),
            Err(e) => {
                tracing::error!(error = %e, "could not reload the TLS certificate; the old one stays")
            }
        }
    }
}

/// TCP_NODELAY, and a send buffer large enough that a NAR response does not stall.
fn configure(tcp: &TcpStream, send_buffer: usize) {
    // Without TCP_NODELAY the last small segment of a response waits for the
    // client's delayed ACK: tens of milliseconds per NAR.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!(error = %e, "could not set TCP_NODELAY");
    }
    // A new connection's send buffer starts at 16 KiB and grows slowly; a NAR
    // response then stops and wakes the task time and again (see ServeConfig).
    if send_buffer > 0 {
        if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(tcp, send_buffer) {
            tracing::warn!(error = %e, "could not set the send buffer size");
        }
    }
}

/// Answers a connection over the cap with a 503 (which clients retry) and closes it,
/// reading what the client sent meanwhile: closing a socket with unread data resets
/// the connection, and the client might never see the answer.
async fn refuse(mut tcp: TcpStream) {
    const BODY: &str = "too many connections; try again shortly\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut sink = [0u8; 4096];
    // Answered once the request has begun to arrive, or after a moment: a client that
    // finds an answer before it has sent its request takes the connection for broken
    // (seen with a client slowed by a loaded machine) instead of reading the 503.
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        tokio::io::AsyncReadExt::read(&mut tcp, &mut sink),
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await?;
        while tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// A response body that keeps its request marked busy (and counted against its
/// forwarded client) until it is done.
struct Tracked {
    inner: axum::body::Body,
    _busy: conn::Busy,
    _pass: Option<client::Pass>,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Tells the operator what clients need: the keys, and the nix.conf and netrc lines.
fn announce(app: &App, addr: std::net::SocketAddr, tls: bool, token_created: bool) {
    let token_file = app.config.data_dir.join("admin-token");
    let scheme = if tls { "https" } else { "http" };
    tracing::info!(%addr, tls, data_dir = %app.config.data_dir.display(), "cachet listening");
    for cache in app.caches.all() {
        let url = format!("{scheme}://{addr}/{}", cache.name);
        tracing::info!(
            cache = %cache.name,
            public = cache.public,
            "public key {}; in nix.conf: `extra-substituters = {url}` and `extra-trusted-public-keys = {}`",
            cache.public_key(),
            cache.public_key()
        );
    }
    if token_created {
        tracing::info!(
            "created the admin token in {}; to push, put `machine {} password <token>` in a netrc file and set `netrc-file` in nix.conf",
            token_file.display(),
            addr.ip()
        );
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_files() {
        assert_eq!(connection_cap(4096, 1 << 20, 1), 4096);
        assert_eq!(connection_cap(4096, 1024, 1), 256);
        assert_eq!(connection_cap(4096, 1024, 2), 170);
        assert_eq!(connection_cap(4096, 100, 1), 1);
        assert_eq!(connection_cap(10, u64::MAX, 1), 10);
    }
}
