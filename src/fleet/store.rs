//! The store's side of the fleet: Redis or Valkey commands on keys prefixed
//! `keystamp:<fleet>:`, each under a short deadline, and the subscription to the fleet's channel.
//! Counting is atomic in the store (`INCR`), the probe lease is `SET NX PX`: no read-modify-write.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use redis::aio::MultiplexedConnection;

use crate::fleet::message::FleetMessage;

/// No store command may hold the fleet task longer than this: past it the store counts as down.
const COMMAND_DEADLINE: Duration = Duration::from_secs(2);
/// Connecting is several round trips (TCP, TLS, HELLO/AUTH, CLIENT SETINFO, SUBSCRIBE): it gets
/// a deadline of its own, or a store answering each command in 1.5 s could never connect.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// Takes the watch lease for a credential, or keeps it if this pod already holds it: one pod per
/// fleet and credential polls the secret store.
const HOLD_LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// A token bucket taken from atomically in the store, on the store's own clock: refill by the
/// time since the last take, hand out up to `want` whole tokens, keep the rest.
const TAKE_TOKENS: &str = r"
local rate = tonumber(ARGV[1]) / 1000.0
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
local at = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local take = math.min(math.floor(tokens), want)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - take), 'at', now)
redis.call('PEXPIRE', KEYS[1], 600000)
return take
";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("store did not answer in time")]
    Timeout,
    #[error("store subscription closed")]
    Closed,
}

pub struct Store {
    connection: MultiplexedConnection,
    prefix: String,
    channel: String,
}

/// The fleet channel's messages as text; the fleet task opens (verifies and parses) them.
pub struct Subscription {
    messages: Pin<Box<dyn Stream<Item = redis::Msg> + Send>>,
}

impl Subscription {
    /// The next message's text; `Some(None)` for a payload that is not text.
    pub async fn next(&mut self) -> Option<Option<String>> {
        let message = self.messages.next().await?;
        Some(message.get_payload::<String>().ok())
    }
}

impl Store {
    /// Connects (commands and the subscription) to the store at `url`. A `rediss://` store is
    /// verified against `roots` (PEM: the system roots plus `upstream_tls.extra_roots`).
    pub async fn connect(
        url: &str,
        fleet: &str,
        roots: &str,
    ) -> Result<(Self, Subscription), StoreError> {
        let client = if url.starts_with("rediss://") {
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(roots.as_bytes().to_vec()),
            };
            redis::Client::build_with_tls(url, certificates)?
        } else {
            redis::Client::open(url)?
        };
        let prefix = format!("keystamp:{fleet}:");
        let channel = format!("{prefix}events");
        // redis-rs' own defaults (1 s to connect, 500 ms per answer) would undercut both.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_DEADLINE))
            .set_response_timeout(Some(COMMAND_DEADLINE));
        let connecting = async {
            let connection = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>((connection, pubsub))
        };
        let (connection, pubsub) = match tokio::time::timeout(CONNECT_DEADLINE, connecting).await {
            Ok(connected) => connected?,
            Err(_) => return Err(StoreError::Timeout),
        };
        let subscription = Subscription {
            messages: Box::pin(pubsub.into_on_message()),
        };
        Ok((
            Self {
                connection,
                prefix,
                channel,
            },
            subscription,
        ))
    }

    fn key(&self, parts: &[&str]) -> String {
        format!("{}{}", self.prefix, parts.join(":"))
    }

    /// Counts one auth failure of a version; the count lapses `window` after the last one.
    pub async fn count_failure(
        &mut self,
        credential: &str,
        fingerprint: &str,
        window: Duration,
    ) -> Result<u64, StoreError> {
        let key = self.key(&["fail", credential, fingerprint]);
        let (count, _): (u64, i64) = deadline(
            redis::pipe()
                .atomic()
                .cmd("INCR")
                .arg(&key)
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(millis(window))
                .query_async(&mut self.connection),
        )
        .await?;
        Ok(count)
    }

    pub async fn clear_failures(
        &mut self,
        credential: &str,
        fingerprint: &str,
    ) -> Result<(), StoreError> {
        let key = self.key(&["fail", credential, fingerprint]);
        let _: i64 = deadline(redis::cmd("DEL").arg(key).query_async(&mut self.connection)).await?;
        Ok(())
    }

    /// Records the open version (for pods that join later) and tells every pod now.
    pub async fn announce_open(
        &mut self,
        message: &FleetMessage,
        sealed: &str,
        open_for: Duration,
    ) -> Result<(), StoreError> {
        let FleetMessage::Open {
            credential,
            fingerprint,
            ..
        } = message
        else {
            return Ok(());
        };
        let key = self.key(&["open", credential, fingerprint]);
        let index = self.key(&["opens"]);
        let _: ((), i64, i64) = deadline(
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(&key)
                .arg(sealed)
                .arg("PX")
                .arg(millis(open_for))
                .cmd("SADD")
                .arg(&index)
                .arg(&key)
                .cmd("PUBLISH")
                .arg(&self.channel)
                .arg(sealed)
                .query_async(&mut self.connection),
        )
        .await?;
        Ok(())
    }

    /// Forgets the open version and tells every pod its probe succeeded.
    pub async fn announce_close(
        &mut self,
        message: &FleetMessage,
        sealed: &str,
    ) -> Result<(), StoreError> {
        let FleetMessage::Close {
            credential,
            fingerprint,
            ..
        } = message
        else {
            return Ok(());
        };
        let key = self.key(&["open", credential, fingerprint]);
        let index = self.key(&["opens"]);
        let _: (i64, i64, i64) = deadline(
            redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(&key)
                .cmd("SREM")
                .arg(&index)
                .arg(&key)
                .cmd("PUBLISH")
                .arg(&self.channel)
                .arg(sealed)
                .query_async(&mut self.connection),
        )
        .await?;
        Ok(())
    }

    pub async fn publish(&mut self, sealed: &str) -> Result<(), StoreError> {
        let _: i64 = deadline(
            redis::cmd("PUBLISH")
                .arg(&self.channel)
                .arg(sealed)
                .query_async(&mut self.connection),
        )
        .await?;
        Ok(())
    }

    /// Every version the fleet holds open now, as written (what a joining pod applies first).
    pub async fn open_versions(&mut self) -> Result<Vec<String>, StoreError> {
        let index = self.key(&["opens"]);
        let keys: Vec<String> = deadline(
            redis::cmd("SMEMBERS")
                .arg(&index)
                .query_async(&mut self.connection),
        )
        .await?;
        let mut open = Vec::new();
        for key in keys {
            let value: Option<String> = deadline(
                redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut self.connection),
            )
            .await?;
            match value {
                Some(text) => open.push(text),
                None => {
                    let _: i64 = deadline(
                        redis::cmd("SREM")
                            .arg(&index)
                            .arg(&key)
                            .query_async(&mut self.connection),
                    )
                    .await?;
                }
            }
        }
        Ok(open)
    }

    /// Takes up to `want` tokens from the fleet's bucket for `credential`.
    pub async fn take_tokens(
        &mut self,
        credential: &str,
        per_second: u32,
        burst: u32,
        want: i64,
    ) -> Result<i64, StoreError> {
        let key = self.key(&["bucket", credential]);
        let script = redis::Script::new(TAKE_TOKENS);
        let mut invocation = script.key(key);
        invocation.arg(per_second).arg(burst).arg(want);
        deadline(invocation.invoke_async(&mut self.connection)).await
    }

    /// Takes the fleet's one probe lease for a version, if nobody holds it.
    pub async fn take_probe(
        &mut self,
        credential: &str,
        fingerprint: &str,
        pod: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let key = self.key(&["probe", credential, fingerprint]);
        let taken: Option<String> = deadline(
            redis::cmd("SET")
                .arg(key)
                .arg(pod)
                .arg("NX")
                .arg("PX")
                .arg(millis(lease))
                .query_async(&mut self.connection),
        )
        .await?;
        Ok(taken.is_some())
    }

    /// Takes or keeps the lease to watch `credential`'s store; whether this pod holds it.
    pub async fn hold_watch(
        &mut self,
        credential: &str,
        pod: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let key = self.key(&["watch", credential]);
        let script = redis::Script::new(HOLD_LEASE);
        let mut invocation = script.key(key);
        invocation.arg(pod).arg(millis(lease));
        let held: i64 = deadline(invocation.invoke_async(&mut self.connection)).await?;
        Ok(held == 1)
    }

    pub async fn release_probe(
        &mut self,
        credential: &str,
        fingerprint: &str,
    ) -> Result<(), StoreError> {
        let key = self.key(&["probe", credential, fingerprint]);
        let _: i64 = deadline(redis::cmd("DEL").arg(key).query_async(&mut self.connection)).await?;
        Ok(())
    }

    /// Marks `pod` alive and answers how many pods are.
    pub async fn heartbeat(&mut self, pod: &str, ttl: Duration) -> Result<i64, StoreError> {
        let key = self.key(&["pods"]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(millis)
            .unwrap_or(0);
        let (_, _, live): (i64, i64, i64) = deadline(
            redis::pipe()
                .atomic()
                .cmd("ZADD")
                .arg(&key)
                .arg(now)
                .arg(pod)
                .cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(now.saturating_sub(millis(ttl)))
                .cmd("ZCARD")
                .arg(&key)
                .query_async(&mut self.connection),
        )
        .await?;
        Ok(live)
    }
}

async fn deadline<T>(
    command: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(COMMAND_DEADLINE, command).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Timeout),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
