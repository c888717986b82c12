//! The contract every `Coordination` keeps, as test cases over two handles of one
//! coordination (two processes' views of one database). An implementation runs them
//! with `crate::coord::contract::tests!(open)`, where `open().await` returns what must
//! be kept while they are used, and the two handles.

use std::sync::Arc;
use std::time::Duration;

use super::{Change, Coordination};
use crate::nix::CacheName;
use crate::store::PackId;

fn cache(name: &str) -> CacheName {
    name.parse().unwrap()
}

/// Whether `f` completes within `ms` milliseconds.
async fn completes<F: std::future::Future>(ms: u64, f: F) -> Option<F::Output> {
    tokio::time::timeout(Duration::from_millis(ms), f)
        .await
        .ok()
}

pub async fn a_barrier_waits_for_earlier_leases_of_every_handle(
    [a, b]: [Arc<dyn Coordination>; 2],
) {
    assert!(b.barrier(Duration::from_secs(5)).await);
    let old = a.lease();
    assert!(!b.barrier(Duration::from_millis(50)).await);
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.barrier(Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Taken after the barrier began: not waited for.
    let new = a.lease();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    drop(old);
    assert!(completes(5_000, waiting).await.unwrap().unwrap());
    drop(new);
    assert!(a.barrier(Duration::from_secs(5)).await);
}

pub async fn exclusive_waits_for_shared_of_every_handle([a, b]: [Arc<dyn Coordination>; 2]) {
    let shared = a.shared(&cache("main")).await.unwrap();
    // Other caches are not held.
    assert!(completes(1_000, b.exclusive(&cache("other")))
        .await
        .is_some_and(|r| r.is_ok()));
    assert!(completes(100, b.exclusive(&cache("main"))).await.is_none());
    let second = completes(1_000, b.shared(&cache("main"))).await;
    assert!(
        second.as_ref().is_some_and(|r| r.is_ok()),
        "shared holds do not exclude each other"
    );
    drop((shared, second));
    let exclusive = completes(5_000, b.exclusive(&cache("main")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exclusive.name(), &cache("main"));
    assert!(completes(100, a.shared(&cache("main"))).await.is_none());
    assert!(completes(100, a.exclusive(&cache("main"))).await.is_none());
    drop(exclusive);
    assert!(completes(5_000, a.shared(&cache("main")))
        .await
        .is_some_and(|r| r.is_ok()));
}

pub async fn key_changes_of_a_cache_are_one_at_a_time([a, b]: [Arc<dyn Coordination>; 2]) {
    let walking = a.key_change(&cache("main")).await.unwrap();
    assert!(completes(100, b.key_change(&cache("main"))).await.is_none());
    assert!(completes(1_000, b.key_change(&cache("other")))
        .await
        .is_some_and(|r| r.is_ok()));
    // A walk does not hold off publications.
    assert!(completes(1_000, b.shared(&cache("main")))
        .await
        .is_some_and(|r| r.is_ok()));
    drop(walking);
    assert!(completes(5_000, b.key_change(&cache("main")))
        .await
        .is_some_and(|r| r.is_ok()));
}

pub async fn one_job_runs_at_a_time_and_every_handle_follows_it(
    [a, b]: [Arc<dyn Coordination>; 2],
) {
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let id = a
        .start_job(
            "gc",
            Box::new(move |progress| {
                Box::pin(async move {
                    progress.phase("waiting");
                    progress.add(3, 10);
                    let _ = finished.await;
                    Ok(serde_json::json!({"done": true}))
                })
            }),
        )
        .await
        .unwrap();
    let busy = b
        .start_job(
            "verify",
            Box::new(|_| Box::pin(async { Ok(serde_json::Value::Null) })),
        )
        .await
        .unwrap_err();
    let super::JobRefused::Busy(busy) = busy else {
        panic!("{busy}")
    };
    assert_eq!(busy.kind, "gc");
    let status = loop {
        let s = b
            .job(id)
            .await
            .unwrap()
            .expect("the job is visible through the other handle");
        if s.phase == "waiting" {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!((status.kind.as_str(), status.done), ("gc", false));
    finish.send(()).unwrap();
    let done = loop {
        let s = b.job(id).await.unwrap().unwrap();
        if s.done {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(done.result, Some(serde_json::json!({"done": true})));
    let next = b
        .start_job(
            "verify",
            Box::new(|_| Box::pin(async { Ok(serde_json::Value::Null) })),
        )
        .await
        .unwrap();
    assert_ne!(next, id);
}

pub async fn notices_reach_every_handle_within_a_second([a, b]: [Arc<dyn Coordination>; 2]) {
    let mut heard = b.changes();
    let mut own = a.changes();
    let packs = Change::PacksDeleted(vec![PackId([7; 16])]);
    a.announce(Change::Tokens).await;
    a.announce(packs.clone()).await;
    for rx in [&mut heard, &mut own] {
        let first = completes(1_000, rx.recv()).await.unwrap().unwrap();
        assert_eq!(first, Change::Tokens);
        let second = completes(1_000, rx.recv()).await.unwrap().unwrap();
        assert_eq!(second, packs);
    }
}

macro_rules! tests {
    ($open:path) => {
        crate::coord::contract::tests!(@cases $open;
            a_barrier_waits_for_earlier_leases_of_every_handle,
            exclusive_waits_for_shared_of_every_handle,
            key_changes_of_a_cache_are_one_at_a_time,
            one_job_runs_at_a_time_and_every_handle_follows_it,
            notices_reach_every_handle_within_a_second
        );
    };
    (@cases $open:path; $($name:ident),*) => {
        mod contract {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (_keep, handles) = $open().await;
                    crate::coord::contract::$name(handles).await;
                }
            )*
        }
    };
}

pub(crate) use tests;
