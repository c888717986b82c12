//! What the server does besides answering: writing the fetches it noted, looking after
//! the free space, and the garbage collection on its schedule.

use std::sync::Arc;
use std::time::Duration;

use crate::app::App;

/// Writes noted fetches every `access::FLUSH_EVERY`, or as soon as the notes are full.
pub async fn write_accesses(app: Arc<App>) {
    let mut tick = tokio::time::interval(crate::access::FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = app.accesses.filled() => {}
        }
        if let Err(e) = app.accesses.flush(app.index.as_ref()).await {
            tracing::warn!(error = %e, "writing the fetches of paths failed");
        }
    }
}

/// Drops this process's copies of what another changed: tokens, caches and their keys
/// are read again, packs the garbage collector deleted leave the cache of packs. A
/// listener that fell behind reads everything again.
pub async fn follow_changes(app: Arc<App>) {
    use crate::coord::Change;
    use tokio::sync::broadcast::error::RecvError;
    let mut changes = app.coord.changes();
    loop {
        let (tokens, caches) = match changes.recv().await {
            Ok(Change::Tokens) => (true, false),
            Ok(Change::Caches) => (false, true),
            Ok(Change::PacksDeleted(packs)) => {
                packs.iter().for_each(|p| app.packs.forget(p));
                (false, false)
            }
            Err(RecvError::Lagged(_)) => (true, true),
            Err(RecvError::Closed) => return,
        };
        if tokens {
            if let Err(e) = app.auth.reload().await {
                tracing::warn!(error = %e, "reading the tokens again failed");
            }
        }
        if caches {
            if let Err(e) = app.caches.reload().await {
                tracing::warn!(error = %e, "reading the caches again failed");
            }
        }
    }
}

/// Looks after the free space every second: the ballast, and the gauges.
pub async fn watch_space(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let a = app.clone();
        // A statvfs, and now and then a file written or removed: off the runtime.
        let _ = tokio::task::spawn_blocking(move || {
            a.space.tend();
            if let Some(free) = a.space.free() {
                a.metrics.storage_free_bytes.set(free as i64);
            }
            a.metrics
                .storage_reserved_bytes
                .set(a.space.promised() as i64);
        })
        .await;
    }
}

/// Starts a garbage collection every `gc.every_secs`, unless one is running.
pub async fn scheduled_gc(app: Arc<App>) {
    let every = app.config.gc.every_secs;
    if every == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: the first collection comes a period after start.
    tick.tick().await;
    loop {
        tick.tick().await;
        let options = crate::gc::Options {
            cache: None,
            dry_run: false,
            now: crate::clock::now(),
            compact: false,
        };
        match crate::gc::start(&app, options).await {
            Ok(id) => tracing::info!(job = id, "scheduled garbage collection started"),
            Err(refused) => tracing::info!(
                why = %refused,
                "scheduled garbage collection skipped"
            ),
        }
    }
}
