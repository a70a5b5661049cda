//! The connection to NATS on a small tokio runtime, and the fleet's stream and buckets.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use tokio::runtime::Runtime;

use super::{FleetConfig, FleetError};

/// The runtime, the client and every bucket, opened (created if absent) at connect.
pub(crate) struct Nats {
    pub rt: Runtime,
    pub js: jetstream::Context,
    pub stream: stream::Stream,
    pub accounts: kv::Store,
    pub leases: kv::Store,
    pub checkpoints: kv::Store,
    pub workers: kv::Store,
}

impl Nats {
    /// `worker`: check that the existing leases bucket and stream fit this worker's TTL.
    pub fn connect(config: &FleetConfig, worker: bool) -> Result<Self, FleetError> {
        config.validate()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("matrix-sync-fleet")
            .enable_all()
            .build()
            .map_err(FleetError::Runtime)?;
        let timeout = config.nats_timeout;
        let name = config.worker_id.clone();
        let url = config.nats_url.clone();
        let (js, stream, accounts, leases, checkpoints, workers) = rt.block_on(async move {
            let client = async_nats::ConnectOptions::new()
                .name(name)
                .connection_timeout(timeout)
                .request_timeout(Some(timeout))
                .event_callback(|event| async move {
                    log::info!("NATS connection: {event}");
                })
                .connect(url.as_str())
                .await
                .map_err(|e| FleetError::Connect(e.to_string()))?;
            let js = jetstream::ContextBuilder::new()
                .timeout(timeout)
                .build(client);
            let stream = js
                .get_or_create_stream(stream::Config {
                    name: config.stream.clone(),
                    subjects: vec![format!("{}.*.events", config.subject_prefix)],
                    duplicate_window: config.duplicate_window,
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| FleetError::js(format!("open the stream {}", config.stream), e))?;
            // The bucket's stream as async-nats' `create_key_value` makes it, created here:
            // that call first asks for the account's limits in a shape nats-server 2.9 does
            // not answer with.
            let bucket = |name: &str, max_age: Duration| {
                let js = js.clone();
                let name = name.to_owned();
                async move {
                    let what = || format!("open the bucket {name}");
                    let made = js
                        .get_or_create_stream(stream::Config {
                            name: format!("KV_{name}"),
                            subjects: vec![format!("$KV.{name}.>")],
                            max_messages_per_subject: 1,
                            max_age,
                            storage: stream::StorageType::File,
                            allow_rollup: true,
                            deny_delete: true,
                            allow_direct: true,
                            discard: stream::DiscardPolicy::New,
                            num_replicas: 1,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| FleetError::js(what(), e))?;
                    let kept = made.cached_info().config.max_age;
                    let store = js
                        .get_key_value(name.as_str())
                        .await
                        .map_err(|e| FleetError::js(what(), e))?;
                    Ok::<_, FleetError>((store, kept))
                }
            };
            let (accounts, _) = bucket(&config.accounts_bucket, Duration::ZERO).await?;
            let (leases, lease_age) = bucket(&config.leases_bucket, config.lease_ttl).await?;
            let (checkpoints, _) = bucket(&config.checkpoints_bucket, Duration::ZERO).await?;
            let (workers, _) = bucket(&config.workers_bucket, config.lease_ttl).await?;
            // Buckets and stream made earlier by a worker with other settings: a lease that
            // the server drops before this worker stops counting on it would let two workers
            // sync one account; a window shorter than a takeover would keep duplicates.
            if worker && (lease_age.is_zero() || lease_age < config.lease_ttl) {
                return Err(FleetError::Config {
                    field: "lease_ttl",
                    reason: "longer than the max_age of the existing leases bucket: use the \
                             fleet's TTL (or delete the bucket while no worker runs)",
                });
            }
            if worker && stream.cached_info().config.duplicate_window < config.lease_ttl * 2 {
                return Err(FleetError::Config {
                    field: "duplicate_window",
                    reason: "the existing stream's duplicate window is shorter than twice \
                             lease_ttl: raise it on the stream, or shorten lease_ttl",
                });
            }
            Ok::<_, FleetError>((js, stream, accounts, leases, checkpoints, workers))
        })?;
        Ok(Self {
            rt,
            js,
            stream,
            accounts,
            leases,
            checkpoints,
            workers,
        })
    }

    /// Runs `f` on the runtime from a thread outside it, for at most `limit`.
    pub fn block_on<T>(
        &self,
        limit: Duration,
        f: impl Future<Output = T>,
    ) -> Result<T, tokio::time::error::Elapsed> {
        self.rt
            .block_on(async { tokio::time::timeout(limit, f).await })
    }
}
