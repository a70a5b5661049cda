//! The operator's and the consumer's side: accounts in, leases and checkpoints read, the
//! stream read back (whole, or through a durable consumer).

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::Message;
use futures_util::StreamExt;

use super::store::Nats;
use super::{headers, valid_name, AccountEntry, FleetConfig, FleetError};

/// A blocking client of a fleet's buckets and stream: for operators (accounts in and out,
/// leases and checkpoints read) and consumers ([`durable`](Self::durable)). Connecting
/// creates the stream and the buckets when absent, as a worker does.
pub struct FleetClient {
    nats: Nats,
    config: FleetConfig,
}

impl std::fmt::Debug for FleetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Who holds a lease, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// The worker's id.
    pub worker: String,
    /// The lease key's revision (changes with every renewal).
    pub revision: u64,
}

/// One message of the stream.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StreamMessage {
    /// Its sequence number in the stream.
    pub sequence: u64,
    /// The account (from the subject).
    pub account: String,
    /// Its `Nats-Msg-Id`.
    pub message_id: String,
    /// The worker that published it ([`headers::WORKER`]).
    pub worker: String,
    /// The lease revision under which it was published ([`headers::LEASE`]).
    pub lease: u64,
    /// The event as JSON: the crate's event shape plus `"account"`.
    pub payload: Vec<u8>,
}

fn to_stream_message(prefix: &str, message: &Message) -> StreamMessage {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let subject = message.subject.as_str();
    let account = subject
        .strip_prefix(prefix)
        .and_then(|s| s.strip_prefix('.'))
        .and_then(|s| s.strip_suffix(".events"))
        .unwrap_or(subject)
        .to_owned();
    StreamMessage {
        sequence: message.info().map(|i| i.stream_sequence).unwrap_or(0),
        account,
        message_id: header("Nats-Msg-Id"),
        worker: header(headers::WORKER),
        lease: header(headers::LEASE).parse().unwrap_or(0),
        payload: message.payload.to_vec(),
    }
}

impl FleetClient {
    /// Connects with `config`'s NATS URL and names (its worker id names the connection).
    pub fn connect(config: &FleetConfig) -> Result<Self, FleetError> {
        Ok(Self {
            nats: Nats::connect(config, false)?,
            config: config.clone(),
        })
    }

    fn run<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, FleetError> {
        self.nats
            .block_on(self.config.nats_timeout, f)
            .map_err(|_| FleetError::js(what, "timed out"))?
            .map_err(|e| FleetError::js(what, e))
    }

    /// Adds or replaces the account `name`. Workers pick it up at once.
    pub fn put_account(&self, name: &str, entry: &AccountEntry) -> Result<u64, FleetError> {
        if !valid_name(name) {
            return Err(FleetError::InvalidAccount(name.to_owned()));
        }
        let value = bytes::Bytes::from(entry.to_json());
        self.run("put an account", async {
            self.nats
                .accounts
                .put(name, value)
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// Removes the account `name`: its worker stops it and gives its lease back. Its
    /// checkpoint stays (adding it again resumes from there).
    pub fn remove_account(&self, name: &str) -> Result<(), FleetError> {
        if !valid_name(name) {
            return Err(FleetError::InvalidAccount(name.to_owned()));
        }
        self.run("remove an account", async {
            self.nats
                .accounts
                .delete(name)
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// The stored entry of account `name`, if any.
    pub fn account(&self, name: &str) -> Result<Option<AccountEntry>, FleetError> {
        let bytes = self.run("read an account", async {
            self.nats
                .accounts
                .get(name)
                .await
                .map_err(|e| e.to_string())
        })?;
        bytes
            .map(|b| AccountEntry::from_json(&b))
            .transpose()
            .map_err(|e| FleetError::js("read an account", e))
    }

    /// Who holds the lease of account `name` now, if anyone.
    pub fn lease(&self, name: &str) -> Result<Option<LeaseInfo>, FleetError> {
        let entry = self.run("read a lease", async {
            self.nats
                .leases
                .entry(name)
                .await
                .map_err(|e| e.to_string())
        })?;
        Ok(entry
            .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
            .map(|e| {
                let value: serde_json::Value = serde_json::from_slice(&e.value).unwrap_or_default();
                LeaseInfo {
                    worker: value["worker"].as_str().unwrap_or_default().to_owned(),
                    revision: e.revision,
                }
            }))
    }

    /// Forces the lease of account `name` free (deletes its key). Its holder finds the lease
    /// gone at its next renewal or checkpoint write (within
    /// [`renew_every`](FleetConfig::renew_every)) and stops the account at once
    /// ([`Lost`](super::LeaseChangeKind::Lost)); any worker may take it meanwhile, so for a
    /// moment two may sync it (their checkpoint writes stay fenced). For evicting an account
    /// from a stuck worker; to stop syncing it, [`remove_account`](Self::remove_account).
    pub fn break_lease(&self, name: &str) -> Result<(), FleetError> {
        if !valid_name(name) {
            return Err(FleetError::InvalidAccount(name.to_owned()));
        }
        self.run("break a lease", async {
            self.nats
                .leases
                .delete(name)
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// The stored checkpoint (`since`) of account `name`, if any.
    pub fn checkpoint(&self, name: &str) -> Result<Option<String>, FleetError> {
        let bytes = self.run("read a checkpoint", async {
            self.nats
                .checkpoints
                .get(name)
                .await
                .map_err(|e| e.to_string())
        })?;
        Ok(bytes
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .filter(|s| !s.is_empty()))
    }

    /// Every message of the stream now, in stream order (an ephemeral ordered consumer; for
    /// audits and tests: it holds the whole stream in memory).
    pub fn read_all(&self) -> Result<Vec<StreamMessage>, FleetError> {
        let prefix = self.config.subject_prefix.clone();
        let stream = self.nats.stream.clone();
        let limit = self.config.nats_timeout;
        let all = self.nats.rt.block_on(async move {
            let mut stream = stream;
            let last = stream
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .last_sequence;
            let mut out = Vec::new();
            if last == 0 {
                return Ok(out);
            }
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    deliver_policy: DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
            loop {
                let next = tokio::time::timeout(limit, messages.next())
                    .await
                    .map_err(|_| "reading the stream timed out".to_owned())?;
                let Some(message) = next else { break };
                let message = message.map_err(|e| e.to_string())?;
                let m = to_stream_message(&prefix, &message);
                let done = m.sequence >= last;
                out.push(m);
                if done {
                    break;
                }
            }
            Ok::<_, String>(out)
        });
        all.map_err(|e| FleetError::js("read the stream", e))
    }

    /// A durable pull consumer named `durable` on the stream, created if absent, delivering
    /// the subjects matching `filter` (e.g. `sync.*.events`, or one account's subject) from
    /// the start; each message is acknowledged explicitly. Its position survives restarts of
    /// the consumer process and of the server.
    pub fn durable(&self, durable: &str, filter: &str) -> Result<DurableConsumer<'_>, FleetError> {
        let config = pull::Config {
            durable_name: Some(durable.to_owned()),
            filter_subject: filter.to_owned(),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        };
        let consumer = self.run("open a durable consumer", async {
            self.nats
                .stream
                .get_or_create_consumer(durable, config)
                .await
                .map_err(|e| e.to_string())
        })?;
        Ok(DurableConsumer {
            client: self,
            consumer,
        })
    }
}

/// A durable consumer of the stream (see [`FleetClient::durable`]).
pub struct DurableConsumer<'a> {
    client: &'a FleetClient,
    consumer: async_nats::jetstream::consumer::Consumer<pull::Config>,
}

impl std::fmt::Debug for DurableConsumer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableConsumer").finish_non_exhaustive()
    }
}

impl DurableConsumer<'_> {
    /// Up to `max` messages, waiting at most `wait` for the first; `handle` is called with
    /// each in stream order, and the message is acknowledged after it returns `true` (a
    /// `false` leaves it unacknowledged: it is delivered again after the consumer's ack wait).
    /// Returns how many were handled.
    pub fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
        mut handle: impl FnMut(&StreamMessage) -> bool,
    ) -> Result<usize, FleetError> {
        let prefix = self.client.config.subject_prefix.clone();
        let limit = wait + self.client.config.nats_timeout;
        let consumer = &self.consumer;
        let done = self
            .client
            .nats
            .block_on(limit + Duration::from_secs(1), async {
                let mut batch = consumer
                    .fetch()
                    .max_messages(max)
                    .expires(wait.max(Duration::from_millis(10)))
                    .messages()
                    .await
                    .map_err(|e| e.to_string())?;
                let mut n = 0;
                while let Some(message) = tokio::time::timeout(limit, batch.next())
                    .await
                    .map_err(|_| "fetch timed out".to_owned())?
                {
                    let message = message.map_err(|e| e.to_string())?;
                    if handle(&to_stream_message(&prefix, &message)) {
                        message.ack().await.map_err(|e| e.to_string())?;
                        n += 1;
                    }
                }
                Ok::<_, String>(n)
            });
        done.map_err(|_| FleetError::js("fetch from a durable consumer", "timed out"))?
            .map_err(|e| FleetError::js("fetch from a durable consumer", e))
    }
}
