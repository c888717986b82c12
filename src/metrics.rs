//! What the server counts, exported at `/metrics` in the Prometheus text format.
//!
//! One `Metrics` per server, held in the `App` and handed to the layers that count
//! (no global registry, so tests can run several servers in one process). Counters
//! are atomics: counting costs a few nanoseconds on the hot paths.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Requests by what they asked for and how they ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route family (`narinfo`, `nar`, `listing`, `log`, `api`, ...).
    pub family: &'static str,
    /// The response status.
    pub status: u16,
}

/// A route family alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    /// The route family.
    pub family: &'static str,
}

/// Why something was refused or closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A short name for the reason.
    pub reason: &'static str,
}

/// A cache, by name (the operator's: a bounded set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// The cache's name.
    pub cache: String,
}

/// Time to the response head, from half a millisecond to about half a minute.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route family and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds from request to response head, by route family.
    pub request_seconds: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    /// Bytes written to clients (headers and bodies).
    pub bytes_sent: Counter,
    /// Bytes read from clients (headers and bodies).
    pub bytes_received: Counter,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Connections refused, by why: every slot (`cap`) or every slot of the address
    /// (`address`) was handling a request.
    pub connections_refused: Family<ReasonLabels, Counter>,
    /// Connections closed to make room for new ones, by what they were doing: kept
    /// alive between requests (`idle`), or not having sent a whole request
    /// (`incomplete`).
    pub connections_evicted: Family<ReasonLabels, Counter>,
    /// Connections the server closed on a timeout, by which.
    pub connections_timed_out: Family<ReasonLabels, Counter>,
    /// NARs stored (uploads that checked out).
    pub nars_ingested: Counter,
    /// Uncompressed bytes of those NARs.
    pub nar_bytes_ingested: Counter,
    /// Stored bytes the uploads added (new chunk frames): the dedup ratio is
    /// `nar_bytes_ingested / stored_bytes_added`.
    pub stored_bytes_added: Counter,
    /// Uncompressed bytes decoded from upload bodies as they streamed in, whether or
    /// not the upload was kept.
    pub upload_bytes_decoded: Counter,
    /// Chunks stored for the first time.
    pub chunks_written: Counter,
    /// Pack objects written.
    pub packs_written: Counter,
    /// Uploads being ingested now.
    pub uploads_in_flight: Gauge,
    /// Uploads waiting for a slot or for memory.
    pub uploads_waiting: Gauge,
    /// Uploads refused, by reason.
    pub uploads_rejected: Family<ReasonLabels, Counter>,
    /// Pushes of a path already present with a different NarHash.
    pub narinfo_conflicts: Counter,
    /// Failed reads or writes of the chunk storage.
    pub storage_errors: Counter,
    /// Fetches not noted for retention because the notes were at their budget.
    pub access_notes_dropped: Counter,
    /// The least free space among the local filesystems written to.
    pub storage_free_bytes: Gauge,
    /// Free space promised to uploads in progress, not written yet.
    pub storage_reserved_bytes: Gauge,
    /// The cache of packs of a remote store.
    pub pack_cache: CacheMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All metrics at zero, registered under the `cachet_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cachet");
        let m = Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            connections_open: Gauge::default(),
            connections_refused: Family::default(),
            connections_evicted: Family::default(),
            connections_timed_out: Family::default(),
            nars_ingested: Counter::default(),
            nar_bytes_ingested: Counter::default(),
            stored_bytes_added: Counter::default(),
            upload_bytes_decoded: Counter::default(),
            chunks_written: Counter::default(),
            packs_written: Counter::default(),
            uploads_in_flight: Gauge::default(),
            uploads_waiting: Gauge::default(),
            uploads_rejected: Family::default(),
            narinfo_conflicts: Counter::default(),
            storage_errors: Counter::default(),
            access_notes_dropped: Counter::default(),
            storage_free_bytes: Gauge::default(),
            storage_reserved_bytes: Gauge::default(),
            pack_cache: CacheMetrics::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "http_requests",
            "HTTP requests by route family and status",
            m.requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Seconds from a request to its response head, by route family",
            m.request_seconds.clone(),
        );
        r.register(
            "http_sent_bytes",
            "Bytes written to clients",
            m.bytes_sent.clone(),
        );
        r.register(
            "http_received_bytes",
            "Bytes read from clients",
            m.bytes_received.clone(),
        );
        r.register(
            "connections_open",
            "Connections open now",
            m.connections_open.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused because every slot (cap), or every slot of their address \
             (address), was handling a request",
            m.connections_refused.clone(),
        );
        r.register(
            "connections_evicted",
            "Connections closed to make room for new ones, by what they were doing (idle \
             between requests, incomplete request)",
            m.connections_evicted.clone(),
        );
        r.register(
            "connections_timed_out",
            "Connections closed by a timeout (idle, header, send)",
            m.connections_timed_out.clone(),
        );
        r.register(
            "nars_ingested",
            "NARs uploaded and stored",
            m.nars_ingested.clone(),
        );
        r.register(
            "nar_ingested_bytes",
            "Uncompressed bytes of the NARs stored",
            m.nar_bytes_ingested.clone(),
        );
        r.register(
            "stored_added_bytes",
            "Stored bytes added by uploads (new chunk frames)",
            m.stored_bytes_added.clone(),
        );
        r.register(
            "upload_decoded_bytes",
            "Uncompressed bytes decoded from upload bodies, kept or not",
            m.upload_bytes_decoded.clone(),
        );
        r.register(
            "chunks_written",
            "Chunks stored for the first time",
            m.chunks_written.clone(),
        );
        r.register(
            "packs_written",
            "Pack objects written",
            m.packs_written.clone(),
        );
        r.register(
            "uploads_in_flight",
            "Uploads being ingested",
            m.uploads_in_flight.clone(),
        );
        r.register(
            "uploads_waiting",
            "Uploads waiting for an ingest slot or memory",
            m.uploads_waiting.clone(),
        );
        r.register(
            "uploads_rejected",
            "Uploads refused, by reason",
            m.uploads_rejected.clone(),
        );
        r.register(
            "narinfo_conflicts",
            "Paths pushed again with a different NarHash (unreproducible builds)",
            m.narinfo_conflicts.clone(),
        );
        r.register(
            "storage_errors",
            "Failed reads and writes of the chunk storage",
            m.storage_errors.clone(),
        );
        r.register(
            "access_notes_dropped",
            "Fetches not noted for retention because the notes were at their budget",
            m.access_notes_dropped.clone(),
        );
        r.register(
            "storage_free_bytes",
            "The least free space among the local filesystems the server writes to",
            m.storage_free_bytes.clone(),
        );
        r.register(
            "storage_reserved_bytes",
            "Free space promised to uploads in progress and not written yet",
            m.storage_reserved_bytes.clone(),
        );
        r.register(
            "pack_cache_hits",
            "Reads of packs answered from the cache on local disk",
            m.pack_cache.hits.clone(),
        );
        r.register(
            "pack_cache_misses",
            "Reads of packs that fetched from the remote store",
            m.pack_cache.misses.clone(),
        );
        r.register(
            "pack_cache_fetches",
            "Packs fetched whole from the remote store into the cache",
            m.pack_cache.fetches.clone(),
        );
        r.register(
            "pack_cache_bytes",
            "Bytes of the cache of packs on local disk, and reserved by its fetches",
            m.pack_cache.bytes.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a refused upload.
    pub fn reject_upload(&self, reason: &'static str) {
        self.uploads_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a refused connection.
    pub fn refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a connection closed to make room.
    pub fn evicted(&self, reason: &'static str) {
        self.connections_evicted
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The exposition, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// What a cache holds and may hold, for `render_caches`.
pub struct CacheFigures {
    /// Its name.
    pub name: String,
    /// What it holds against its quota.
    pub used_bytes: u64,
    /// Its quota, if it has one.
    pub quota_bytes: Option<u64>,
}

/// Each cache's use and quota in the Prometheus text format, made anew for each
/// reading: the set of caches changes at run time, and these series name them, so
/// they are shown to the server admin only (see `http::health::metrics`).
pub fn render_caches(caches: &[CacheFigures]) -> String {
    let mut registry = Registry::with_prefix("cachet");
    let used: Family<CacheLabels, Gauge> = Family::default();
    let quota: Family<CacheLabels, Gauge> = Family::default();
    for c in caches {
        let labels = CacheLabels {
            cache: c.name.clone(),
        };
        used.get_or_create(&labels).set(c.used_bytes as i64);
        if let Some(q) = c.quota_bytes {
            quota.get_or_create(&labels).set(q as i64);
        }
    }
    registry.register(
        "cache_used_bytes",
        "What each cache holds against its quota: paths, uploads waiting for a narinfo, \
         logs and realisations, in stored bytes",
        used,
    );
    registry.register(
        "cache_quota_bytes",
        "Each cache's quota, in stored bytes, for those that have one",
        quota,
    );
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String does not fail");
    out
}

/// The `Content-Type` of `render`'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                family: "narinfo",
                status: 404,
            })
            .inc();
        m.request_seconds
            .get_or_create(&FamilyLabels { family: "nar" })
            .observe(0.01);
        m.reject_upload("too_large");
        m.connections_open.inc();
        let text = m.render();
        assert!(
            text.contains("cachet_http_requests_total{family=\"narinfo\",status=\"404\"} 1"),
            "{text}"
        );
        assert!(text.contains("cachet_uploads_rejected_total{reason=\"too_large\"} 1"));
        assert!(text.contains("cachet_connections_open 1"));
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        assert!(parsed.samples.len() > 10);
    }
}

/// What the cache reports, for the metrics.
#[derive(Clone, Default)]
pub struct CacheMetrics {
    /// Reads answered from a cached file.
    pub hits: Counter,
    /// Reads that waited for a fetch, or went to the store.
    pub misses: Counter,
    /// Packs fetched whole from the store.
    pub fetches: Counter,
    /// Bytes of the cached files and of the fetches under way.
    pub bytes: Gauge,
}
