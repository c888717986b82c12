//! Packs in an S3-compatible store (AWS S3, Garage, MinIO, Ceph RGW) through
//! `object_store`'s S3 client, which signs every request (payload hash included, as
//! Garage requires) and retries throttling, 5xx and failed connections with backoff.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::config::StorageConfig;

/// The store `config` (of type `s3`) names. Credentials not in the config come from
/// the standard AWS environment variables, then from the instance's or web identity's
/// role, as `object_store` finds them. Nothing secret is in the errors.
pub fn open(config: &StorageConfig) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let bucket = config
        .bucket
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("storage.bucket is needed with type = \"s3\""))?;
    // HTTPS endpoints go through reqwest's rustls, which takes the process's provider:
    // ring, as everywhere in the server (one already installed stays).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let request = Duration::from_secs(config.request_timeout_secs);
    let client = ClientOptions::new()
        .with_timeout(request)
        .with_connect_timeout(request.min(Duration::from_secs(5)));
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(config.retry_timeout_secs),
    };
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(client)
        .with_allow_http(config.allow_http)
        .with_virtual_hosted_style_request(config.virtual_hosted_style)
        .with_retry(retry);
    if let Some(region) = &config.region {
        builder = builder.with_region(region);
    }
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(id) = &config.access_key_id {
        builder = builder.with_access_key_id(id);
    }
    if let Some(secret) = &config.secret_access_key {
        builder = builder.with_secret_access_key(&secret.0);
    }
    if let Some(path) = &config.secret_access_key_file {
        let secret = crate::secret_file::read(path)?;
        builder = builder.with_secret_access_key(secret.trim());
    }
    let store = builder
        .build()
        .map_err(|e| anyhow::anyhow!("storage settings for bucket {bucket:?}: {e}"))?;
    let prefix = config.prefix.trim_matches('/');
    Ok(if prefix.is_empty() {
        Arc::new(store)
    } else {
        Arc::new(PrefixStore::new(store, prefix))
    })
}

/// What an operator reads when the start's probe of the store (`PackStore::check`)
/// failed: which store, and what to look at.
pub fn unusable(config: &StorageConfig, e: &object_store::Error) -> anyhow::Error {
    let bucket = config.bucket.as_deref().unwrap_or_default();
    let at = config.endpoint.as_deref().unwrap_or("AWS");
    let text = e.to_string();
    let hint = match e {
        _ if text.contains("NoSuchBucket") => "the bucket does not exist",
        object_store::Error::NotFound { .. } => "the bucket does not exist",
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            "access was denied: check the access key, its secret and the key's rights on the bucket"
        }
        _ if text.contains("AccessDenied")
            || text.contains("InvalidAccessKeyId")
            || text.contains("SignatureDoesNotMatch") =>
        {
            "access was denied: check the access key, its secret and the key's rights on the bucket"
        }
        _ => "the store did not answer as S3 does: check storage.endpoint, storage.region and the network",
    };
    anyhow::anyhow!(
        "the storage is not usable: bucket {bucket:?} at {at}: {hint} (writing, reading and \
         deleting a probe object failed: {text})"
    )
}
