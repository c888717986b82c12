//! Starting and stopping the server.

use crate::app::App;
use crate::config::Config;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let opened = App::open(config)?;
    let app = opened.app;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    announce(&app, addr, opened.admin_token_created);
    let router = crate::http::router(app.clone());
    let send_buffer = app.config.serve.send_buffer_bytes;
    let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
        // Without TCP_NODELAY the last small segment of a response waits for the
        // client's delayed ACK: tens of milliseconds per NAR.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        // A new connection's send buffer starts at 16 KiB and grows slowly; a NAR
        // response then stops and wakes the task time and again (see ServeConfig).
        if send_buffer > 0 {
            let set = rustix::net::sockopt::set_socket_send_buffer_size(&*tcp, send_buffer);
            if let Err(e) = set {
                tracing::warn!(error = %e, "could not set the send buffer size");
            }
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    app.index.flush()?;
    tracing::info!("stopped");
    Ok(())
}

/// Tells the operator what clients need: the keys, and the nix.conf and netrc lines.
fn announce(app: &App, addr: std::net::SocketAddr, token_created: bool) {
    let token_file = app.config.data_dir.join("admin-token");
    tracing::info!(%addr, data_dir = %app.config.data_dir.display(), "cachet listening");
    for cache in app.caches.all() {
        let url = format!("http://{addr}/{}", cache.name);
        tracing::info!(
            cache = %cache.name,
            public = cache.public,
            "public key {}; in nix.conf: `extra-substituters = {url}` and `extra-trusted-public-keys = {}`",
            cache.public_key,
            cache.public_key
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
