//! Connection floods against a real server, and the fresh client that must still get
//! through: attackers that hold sockets (silent, trickling a request head, or kept
//! alive with a request every so often) from one or many loopback addresses, and
//! reconnect whenever the server closes them, as a real attacker would.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::Server;

/// What each attacking connection does.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Connects and sends nothing.
    Silent,
    /// Sends a request head a byte at a time, every `every`.
    SlowHead(Duration),
    /// Sends `GET /health` at once and then every `every`, reading each answer.
    KeepAlive(Duration),
}

/// A flood of connections, running on a runtime of its own until dropped.
pub struct Flood {
    stop: Arc<AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
    /// Connections made, reconnections included.
    pub connects: Arc<AtomicU64>,
    /// Requests answered (for kept-alive connections).
    pub answered: Arc<AtomicU64>,
}

impl Flood {
    /// `count` connections to `server` behaving as `behaviour`, spread over `sources`
    /// (loopback addresses to connect from), each reconnecting `reconnect` after the
    /// server closes it.
    pub fn start(
        server: &Server,
        count: usize,
        sources: &[IpAddr],
        behaviour: Behaviour,
        reconnect: Duration,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let target = SocketAddr::from(([127, 0, 0, 1], server.port));
        for i in 0..count {
            let source = sources[i % sources.len()];
            let (stop, connects, answered) = (stop.clone(), connects.clone(), answered.clone());
            runtime.spawn(async move {
                // Spread the first connections over a second, as clients arrive.
                tokio::time::sleep(Duration::from_micros((i as u64 * 250) % 1_000_000)).await;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(conn) = connect(source, target).await {
                        connects.fetch_add(1, Ordering::Relaxed);
                        hold(conn, behaviour, &stop, &answered).await;
                    }
                    tokio::time::sleep(reconnect).await;
                }
            });
        }
        Self {
            stop,
            runtime: Some(runtime),
            connects,
            answered,
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// The loopback addresses 127.0.0.`first` to 127.0.0.`last`.
pub fn loopback(first: u8, last: u8) -> Vec<IpAddr> {
    (first..=last)
        .map(|n| IpAddr::from([127, 0, 0, n]))
        .collect()
}

async fn connect(source: IpAddr, target: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

/// Behaves on `conn` until the server closes it (or the flood stops).
async fn hold(
    mut conn: tokio::net::TcpStream,
    behaviour: Behaviour,
    stop: &AtomicBool,
    answered: &AtomicU64,
) {
    let mut buf = vec![0u8; 4096];
    match behaviour {
        Behaviour::Silent => {
            // Returns when the server closes it.
            let _ = conn.read(&mut buf).await;
        }
        Behaviour::SlowHead(every) => {
            let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            for byte in head.iter().cycle() {
                if stop.load(Ordering::Relaxed) || conn.write_all(&[*byte]).await.is_err() {
                    return;
                }
                // Read what the server says (its closing), without waiting for it.
                match tokio::time::timeout(every, conn.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    _ => {}
                }
            }
        }
        Behaviour::KeepAlive(every) => loop {
            let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
            if stop.load(Ordering::Relaxed) || conn.write_all(request).await.is_err() {
                return;
            }
            match conn.read(&mut buf).await {
                Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200") => {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n) if n > 0 => {}
                _ => return,
            }
            // Idle until the next request, or until the server closes it.
            match tokio::time::timeout(every, conn.read(&mut buf)).await {
                Ok(_) => return,
                Err(_) => continue,
            }
        },
    }
}

/// How fresh clients fared.
#[derive(Debug, Default)]
pub struct Tries {
    /// Answered 200 within the limit.
    pub served: usize,
    /// All tries.
    pub tries: usize,
    /// The slowest answer.
    pub slowest: Duration,
    /// What went wrong with the others.
    pub failures: Vec<String>,
}

/// `tries` fresh clients (a new connection each, from 127.0.0.1), `every` apart, each
/// asking for `path` and given `limit` for its answer.
pub fn fresh_clients(
    server: &Server,
    path: &str,
    tries: usize,
    every: Duration,
    limit: Duration,
) -> Tries {
    let client = reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(limit)
        .build()
        .unwrap();
    let mut out = Tries::default();
    for _ in 0..tries {
        let started = Instant::now();
        let got = client.get(format!("{}{path}", server.base())).send();
        let took = started.elapsed();
        out.tries += 1;
        out.slowest = out.slowest.max(took);
        match got {
            Ok(r) if r.status() == 200 && took <= limit => out.served += 1,
            Ok(r) => out.failures.push(format!("{} after {took:?}", r.status())),
            Err(e) => out.failures.push(format!("{e} after {took:?}")),
        }
        std::thread::sleep(every);
    }
    out
}
