//! Runtime configuration, read from the environment by [`catga::run`](crate::run).
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `NATS_URL` | NATS server(s), comma separated | unset: embedded in-memory transport |
//! | `CATGA_SERVICE` | service name | the executable's name |
//! | `CATGA_INSTANCE_ID` | replica id | `HOSTNAME` (the pod name), else a random id |
//! | `CATGA_REQUEST_TIMEOUT_MS` | default reply time-out of `send` | 5000 |
//! | `CATGA_DRAIN_TIMEOUT_MS` | how long shutdown waits for in-flight handlers | 10000 |
//! | `CATGA_CONCURRENCY` | default in-flight limit per handler | 256 |
//! | `CATGA_SUBSCRIPTION_CAPACITY` | messages buffered per subscription | 8192 |
//! | `CATGA_CLIENT_ONLY` | `1`/`true`: start with no handlers | false |

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// Default in-flight limit per handler.
pub const DEFAULT_CONCURRENCY: usize = 256;
/// Default number of buffered messages per subscription.
pub const DEFAULT_CAPACITY: usize = crate::transport::memory::DEFAULT_CAPACITY;
/// Default time shutdown waits for in-flight handlers.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a runtime needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS URL; `None` runs on the embedded in-memory transport.
    pub nats_url: Option<String>,
    /// Service name.
    pub service: String,
    /// Replica id, unique among the service's replicas.
    pub instance_id: String,
    /// Default reply time-out of `send`.
    pub request_timeout: Duration,
    /// How long shutdown waits for in-flight handlers.
    pub drain_timeout: Duration,
    /// Default in-flight limit per handler.
    pub concurrency: usize,
    /// Messages buffered per subscription.
    pub subscription_capacity: usize,
    /// Start with no handlers (a process that only sends).
    pub client_only: bool,
}

impl Default for Config {
    fn default() -> Config {
        let service = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "catga".to_owned());
        Config {
            nats_url: None,
            // A whole NUID: its first half is shared by every id of one process.
            instance_id: format!("{service}-{}", crate::message::new_message_id()),
            service,
            request_timeout: crate::client::DEFAULT_REQUEST_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            concurrency: DEFAULT_CONCURRENCY,
            subscription_capacity: DEFAULT_CAPACITY,
            client_only: false,
        }
    }
}

impl Config {
    /// Reads the variables in the table above; unset ones keep their default.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any lookup function (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut c = Config::default();
        let get = |name: &str| get(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        c.nats_url = get("NATS_URL");
        if let Some(s) = get("CATGA_SERVICE") {
            c.service = s;
        }
        if let Some(id) = get("CATGA_INSTANCE_ID").or_else(|| get("HOSTNAME")) {
            c.instance_id = id;
        }
        if let Some(ms) = get("CATGA_REQUEST_TIMEOUT_MS") {
            c.request_timeout = Duration::from_millis(number("CATGA_REQUEST_TIMEOUT_MS", &ms)?);
        }
        if let Some(ms) = get("CATGA_DRAIN_TIMEOUT_MS") {
            c.drain_timeout = Duration::from_millis(number("CATGA_DRAIN_TIMEOUT_MS", &ms)?);
        }
        if let Some(n) = get("CATGA_CONCURRENCY") {
            c.concurrency = positive("CATGA_CONCURRENCY", &n)?;
        }
        if let Some(n) = get("CATGA_SUBSCRIPTION_CAPACITY") {
            c.subscription_capacity = positive("CATGA_SUBSCRIPTION_CAPACITY", &n)?;
        }
        if let Some(v) = get("CATGA_CLIENT_ONLY") {
            c.client_only = match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => return Err(config_error("CATGA_CLIENT_ONLY", &v, "expected true or false")),
            };
        }
        Ok(c)
    }
}

/// A server URL for logs: user names, passwords and tokens
/// (`nats://user:secret@host`) are replaced by `***`.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &one[..scheme + 3], &one[at..]),
            (None, Some(at)) => format!("***{}", &one[at..]),
            _ => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn number(name: &str, v: &str) -> Result<u64> {
    v.parse::<u64>()
        .map_err(|_| config_error(name, v, "expected a whole number"))
}

fn positive(name: &str, v: &str) -> Result<usize> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(config_error(name, v, "expected a whole number above 0")),
    }
}

fn config_error(name: &str, value: &str, what: &str) -> Error {
    Error::new(ErrorKind::Config, format!("{name}={value:?}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_logs_hide_credentials() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("nats://app:s3cret@nats:4222"), "nats://***@nats:4222");
        assert_eq!(
            redact_url("nats://tok@a:4222,nats://b:4222"),
            "nats://***@a:4222,nats://b:4222"
        );
        assert_eq!(redact_url("user:pw@host:4222"), "***@host:4222");
    }

    #[test]
    fn reads_and_validates_variables() {
        let c = Config::from_lookup(|n| match n {
            "NATS_URL" => Some("nats://127.0.0.1:4222".into()),
            "CATGA_SERVICE" => Some("orders".into()),
            "HOSTNAME" => Some("orders-7d9f".into()),
            "CATGA_REQUEST_TIMEOUT_MS" => Some("250".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(c.nats_url.as_deref(), Some("nats://127.0.0.1:4222"));
        assert_eq!(c.service, "orders");
        assert_eq!(c.instance_id, "orders-7d9f");
        assert_eq!(c.request_timeout, Duration::from_millis(250));

        let err = Config::from_lookup(|n| (n == "CATGA_CONCURRENCY").then(|| "0".into())).expect_err("zero");
        assert!(err.message().contains("CATGA_CONCURRENCY"), "{err}");
        let memory = Config::from_lookup(|_| None).expect("defaults");
        assert!(memory.nats_url.is_none());
        let other = Config::from_lookup(|_| None).expect("defaults");
        assert_ne!(
            memory.instance_id, other.instance_id,
            "default instance ids differ"
        );
    }
}
