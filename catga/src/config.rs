//! Runtime configuration, read from the environment by [`catga::run`](crate::run).
//!
//! [`SETTINGS`] is the one table of variables: [`Config::from_lookup`]
//! reads exactly these names, and the README's configuration table is
//! checked against it by a test. Defaults live here and nowhere else.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// Default time a `send` waits for a reply.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default in-flight limit per subscription.
pub const DEFAULT_CONCURRENCY: usize = 256;
/// Default number of messages a subscription buffers beyond its in-flight
/// limit before it drops (and counts) further ones.
pub const DEFAULT_CAPACITY: usize = 8192;
/// Default time shutdown waits for in-flight handlers.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of subscriptions (and tasks) per handler.
pub const DEFAULT_PARALLEL: usize = 1;

/// One environment variable: its name, what it means, its default.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The variable.
    pub name: &'static str,
    /// What it sets.
    pub meaning: &'static str,
    /// Its value when unset.
    pub default: &'static str,
}

/// Every variable [`Config::from_env`] reads.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "NATS_URL",
        meaning: "NATS server(s), comma separated",
        default: "unset: the embedded in-memory transport",
    },
    Setting {
        name: "CATGA_SERVICE",
        meaning: "service name",
        default: "the executable's name",
    },
    Setting {
        name: "CATGA_INSTANCE_ID",
        meaning: "replica id, unique among the service's replicas",
        default: "`HOSTNAME` (the pod name), else a random id",
    },
    Setting {
        name: "HOSTNAME",
        meaning: "replica id when `CATGA_INSTANCE_ID` is unset (Kubernetes sets it to the pod name)",
        default: "unset",
    },
    Setting {
        name: "CATGA_REQUEST_TIMEOUT_MS",
        meaning: "default reply time-out of `send`, and time-out of `publish`",
        default: "5000",
    },
    Setting {
        name: "CATGA_DRAIN_TIMEOUT_MS",
        meaning: "one deadline for the whole graceful shutdown",
        default: "10000",
    },
    Setting {
        name: "CATGA_CONCURRENCY",
        meaning: "default in-flight limit per subscription (`concurrency = N` overrides)",
        default: "256",
    },
    Setting {
        name: "CATGA_PARALLEL",
        meaning: "default subscriptions and tasks per handler (`parallel = N` overrides)",
        default: "1",
    },
    Setting {
        name: "CATGA_SUBSCRIPTION_CAPACITY",
        meaning: "messages a subscription buffers beyond its in-flight limit, then drops and counts",
        default: "8192",
    },
    Setting {
        name: "CATGA_CLIENT_ONLY",
        meaning: "`true`: start with no handlers (a process that only sends)",
        default: "false",
    },
    Setting {
        name: "RUST_LOG",
        meaning: "log filter (`tracing_subscriber` targets syntax)",
        default: "info",
    },
];

/// Everything a runtime needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS URL(s); `None` runs on the embedded in-memory transport.
    pub nats_url: Option<String>,
    /// Service name.
    pub service: String,
    /// Replica id, unique among the service's replicas.
    pub instance_id: String,
    /// Default reply time-out of `send`.
    pub request_timeout: Duration,
    /// One deadline for the whole graceful shutdown.
    pub drain_timeout: Duration,
    /// Default in-flight limit per subscription.
    pub concurrency: usize,
    /// Default subscriptions and tasks per handler.
    pub parallel: usize,
    /// Messages buffered per subscription beyond its in-flight limit.
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
            instance_id: format!("{service}-{}", crate::wire::new_message_id()),
            service,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            concurrency: DEFAULT_CONCURRENCY,
            parallel: DEFAULT_PARALLEL,
            subscription_capacity: DEFAULT_CAPACITY,
            client_only: false,
        }
    }
}

impl Config {
    /// Reads the variables of [`SETTINGS`]; unset ones keep their default.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any lookup function (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut c = Config::default();
        let get = |name: &str| {
            debug_assert!(
                SETTINGS.iter().any(|s| s.name == name),
                "{name} is not in SETTINGS"
            );
            get(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
        };
        c.nats_url = get("NATS_URL");
        if let Some(s) = get("CATGA_SERVICE") {
            c.service = s;
        }
        if let Some(id) = get("CATGA_INSTANCE_ID").or_else(|| get("HOSTNAME")) {
            c.instance_id = id;
        }
        if let Some(ms) = get("CATGA_REQUEST_TIMEOUT_MS") {
            c.request_timeout = Duration::from_millis(positive("CATGA_REQUEST_TIMEOUT_MS", &ms)? as u64);
        }
        if let Some(ms) = get("CATGA_DRAIN_TIMEOUT_MS") {
            c.drain_timeout = Duration::from_millis(number("CATGA_DRAIN_TIMEOUT_MS", &ms)?);
        }
        if let Some(n) = get("CATGA_CONCURRENCY") {
            c.concurrency = positive("CATGA_CONCURRENCY", &n)?;
        }
        if let Some(n) = get("CATGA_PARALLEL") {
            c.parallel = positive("CATGA_PARALLEL", &n)?;
        }
        if let Some(n) = get("CATGA_SUBSCRIPTION_CAPACITY") {
            c.subscription_capacity = positive("CATGA_SUBSCRIPTION_CAPACITY", &n)?;
        }
        if let Some(v) = get("CATGA_CLIENT_ONLY") {
            c.client_only = boolean("CATGA_CLIENT_ONLY", &v)?;
        }
        Ok(c)
    }

    /// The configuration table as Markdown (the README carries it).
    pub fn table_markdown() -> String {
        let mut out = String::from("| variable | meaning | default |\n|---|---|---|\n");
        for s in SETTINGS {
            out.push_str(&format!("| `{}` | {} | {} |\n", s.name, s.meaning, s.default));
        }
        out
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

fn boolean(name: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(config_error(name, v, "expected true or false")),
    }
}

pub(crate) fn config_error(name: &str, value: &str, what: &str) -> Error {
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
            "CATGA_INSTANCE_ID" => Some("orders-7d9f".into()),
            "CATGA_REQUEST_TIMEOUT_MS" => Some("250".into()),
            "CATGA_PARALLEL" => Some("2".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(c.nats_url.as_deref(), Some("nats://127.0.0.1:4222"));
        assert_eq!(c.service, "orders");
        assert_eq!(c.instance_id, "orders-7d9f");
        assert_eq!(c.request_timeout, Duration::from_millis(250));
        assert_eq!(c.parallel, 2);

        let err = Config::from_lookup(|n| (n == "CATGA_CONCURRENCY").then(|| "0".into())).expect_err("zero");
        assert!(err.message().contains("CATGA_CONCURRENCY"), "{err}");
        let err =
            Config::from_lookup(|n| (n == "CATGA_CLIENT_ONLY").then(|| "maybe".into())).expect_err("bool");
        assert!(err.message().contains("CATGA_CLIENT_ONLY"), "{err}");
        let memory = Config::from_lookup(|_| None).expect("defaults");
        assert!(memory.nats_url.is_none());
    }

    #[test]
    fn the_table_lists_every_setting() {
        let table = Config::table_markdown();
        for s in SETTINGS {
            assert!(table.contains(&format!("`{}`", s.name)));
        }
    }
}
