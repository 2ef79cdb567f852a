//! Secured brokers: nats-server configured for user/password, token, nkey,
//! TLS, mutual TLS, TLS-first and decentralized (JWT) auth, and
//! redis-server with a password, an ACL user, TLS and mutual TLS; each with
//! a runtime (and for NATS a client) that must get in, and wrong settings
//! that must be refused with a clear error that never shows the secret.
//! Every log line of the test is captured and searched for the secrets.

use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use catga::{
    Client, Config, Context, ErrorKind, NatsSecurity, RedisTls, Result, Runtime, Secret, State, Versioned,
    command,
};
use catga_tests::{NatsServer, Pki, RedisServer};
use serde::{Deserialize, Serialize};

/// Answers with a greeting.
#[command(reply = String)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    /// Who to greet.
    pub name: String,
}

#[command]
async fn hello(h: Hello) -> Result<String> {
    Ok(format!("hello {}", h.name))
}

/// Counts in the state store: each call adds one to counter `key`.
#[command(reply = u64)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Remember {
    /// Which counter.
    pub key: String,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct Count(u64);

impl State for Count {
    const KIND: &'static str = "count";
}

#[command]
async fn remember(ctx: &Context, r: Remember) -> Result<u64> {
    let mut count = ctx
        .try_load::<Count>(&r.key)
        .await?
        .unwrap_or_else(|| Versioned::new(r.key.clone(), Count::default()));
    count.0 += 1;
    let n = count.0;
    ctx.save(count).await?;
    Ok(n)
}

/// Everything logged in this process.
fn log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    let buffer = LOG.get_or_init(|| Mutex::new(Vec::new()));
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        struct Sink;
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                log()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| Sink)
            .try_init();
    });
    buffer
}

fn logged() -> String {
    String::from_utf8_lossy(&log().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// Asserts that no log line and no error text shows `secret`.
fn assert_hidden(secret: &str, errors: &[String]) {
    assert!(!logged().contains(secret), "the secret appears in the log");
    for e in errors {
        assert!(!e.contains(secret), "the secret appears in an error: {e}");
    }
}

fn builder(url: &str, security: NatsSecurity) -> catga::RuntimeBuilder {
    Runtime::builder()
        .nats_url(url)
        .nats_security(security)
        .instance_id("secured")
        .handlers(|s| s.name() == "secured::hello")
}

/// A runtime that must get in and serve, and a client with the same
/// settings that must reach it.
async fn serves(url: &str, security: NatsSecurity) {
    let _ = log();
    let rt = builder(url, security.clone()).start().await.expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
    let mut config = Config::default();
    config.nats_url = Some(url.to_owned());
    config.nats_security = security;
    let client = Client::connect_with(&config)
        .await
        .expect("the client gets in too");
    let reply = client.send(Hello { name: "tls".into() }).await.expect("served");
    assert_eq!(reply, "hello tls");
    rt.shutdown().await.expect("clean shutdown");
}

/// A runtime that must stay not ready, saying why, and a client that must
/// be refused at once with `kind`. Returns the texts it saw.
async fn refused(url: &str, security: NatsSecurity, kind: ErrorKind, why: &str) -> Vec<String> {
    refused_logging(url, security, kind, why).await.0
}

/// [`refused`], and what was logged meanwhile. Refusals take turns: under
/// plain `cargo test` the tests of this file share one process and its
/// log, and a count of refusal lines would add up those of every test
/// running at the same time.
async fn refused_logging(
    url: &str,
    security: NatsSecurity,
    kind: ErrorKind,
    why: &str,
) -> (Vec<String>, String) {
    static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = TURNS.lock().await;
    let before = log().lock().unwrap_or_else(|p| p.into_inner()).len();
    let rt = builder(url, security.clone())
        .start()
        .await
        .expect("start-up itself succeeds");
    let started = Instant::now();
    let mut readiness = rt.readiness();
    while started.elapsed() < Duration::from_secs(3) {
        readiness = rt.readiness();
        if readiness.failing.iter().any(|f| f.contains(why)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!readiness.ready);
    assert!(
        readiness.failing.iter().any(|f| f.contains(why)),
        "readiness says why: {readiness:?}\n{}",
        logged()
            .lines()
            .filter(|l| l.contains("NATS") || l.contains("nats"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut config = Config::default();
    config.nats_url = Some(url.to_owned());
    config.nats_security = security;
    let started = Instant::now();
    let err = Client::connect_with(&config).await.expect_err("refused");
    assert_eq!(err.kind(), kind, "{err}");
    assert!(err.message().contains(why), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "within its connect time-out"
    );
    let _ = rt.shutdown().await;
    let mut texts = readiness.failing;
    texts.push(err.to_string());
    let meanwhile =
        String::from_utf8_lossy(&log().lock().unwrap_or_else(|p| p.into_inner())[before..]).into_owned();
    (texts, meanwhile)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_in_the_url() {
    let password = format!("pw-{}", catga::new_message_id());
    let server = NatsServer::start_with(&format!(
        "authorization {{ user: svc, password: \"{password}\" }}"
    ));
    let port = server.port();
    serves(
        &format!("nats://svc:{password}@127.0.0.1:{port}"),
        NatsSecurity::default(),
    )
    .await;
    let wrong = format!("nope-{}", catga::new_message_id());
    let (texts, meanwhile) = refused_logging(
        &format!("nats://svc:{wrong}@127.0.0.1:{port}"),
        NatsSecurity::default(),
        ErrorKind::Unauthorized,
        "refused the credentials",
    )
    .await;
    assert_hidden(&password, &texts);
    assert_hidden(&wrong, &texts);
    // One line per attempt, with back-off: not several a second.
    let lines = meanwhile
        .matches("the NATS server refused the credentials")
        .count();
    assert!(lines >= 2, "each attempt is logged: {lines}");
    assert!(
        lines <= 20,
        "with back-off, not a flood: {lines} lines in about 4 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_the_url() {
    let token = format!("tok-{}", catga::new_message_id());
    let server = NatsServer::start_with(&format!("authorization {{ token: \"{token}\" }}"));
    let port = server.port();
    serves(
        &format!("nats://{token}@127.0.0.1:{port}"),
        NatsSecurity::default(),
    )
    .await;
    let texts = refused(
        &format!("nats://not-{token}@127.0.0.1:{port}"),
        NatsSecurity::default(),
        ErrorKind::Unauthorized,
        "refused the credentials",
    )
    .await;
    assert_hidden(&token, &texts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_user() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let server = NatsServer::start_with(&format!(
        "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
        user.public_key()
    ));
    let url = server.url();
    let security = NatsSecurity {
        nkey_seed: Some(Secret::new(seed.clone())),
        ..NatsSecurity::default()
    };
    serves(&url, security).await;
    let other = nkeys::KeyPair::new_user().seed().expect("seed");
    let texts = refused(
        &url,
        NatsSecurity {
            nkey_seed: Some(Secret::new(other.clone())),
            ..NatsSecurity::default()
        },
        ErrorKind::Unauthorized,
        "refused the credentials",
    )
    .await;
    assert_hidden(&seed, &texts);
    assert_hidden(&other, &texts);
}

/// The NATS server's TLS block for `pki`'s files.
fn server_block(pki: &Pki, extra: &str) -> String {
    let p = |n: &str| pki.path(n).display().to_string();
    format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\" {extra} }}",
        p("server.pem"),
        p("server-key.pem"),
        p("ca.pem")
    )
}

fn with_ca(pki: &Pki) -> NatsSecurity {
    NatsSecurity {
        tls_ca: Some(pki.path("ca.pem")),
        ..NatsSecurity::default()
    }
}

fn tls_url(server: &NatsServer) -> String {
    format!("tls://127.0.0.1:{}", server.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_custom_ca() {
    let pki = Pki::new(false);
    let server = NatsServer::start_with(&server_block(&pki, ""));
    serves(&tls_url(&server), with_ca(&pki)).await;
    // Without the CA, the server's certificate is not trusted.
    refused(
        &tls_url(&server),
        NatsSecurity::default(),
        ErrorKind::Config,
        "TLS handshake",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_refused() {
    let pki = Pki::new(true);
    let server = NatsServer::start_with(&server_block(&pki, ""));
    refused(
        &tls_url(&server),
        with_ca(&pki),
        ErrorKind::Config,
        "TLS handshake",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let pki = Pki::new(false);
    let server = NatsServer::start_with(&server_block(&pki, ", verify: true"));
    let mtls = NatsSecurity {
        tls_cert: Some(pki.path("client.pem")),
        tls_key: Some(pki.path("client-key.pem")),
        ..with_ca(&pki)
    };
    serves(&tls_url(&server), mtls).await;
    // Without a client certificate the server refuses the handshake.
    refused(
        &tls_url(&server),
        with_ca(&pki),
        ErrorKind::Config,
        "TLS handshake",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_before_the_server_greets() {
    let pki = Pki::new(false);
    let server = NatsServer::start_with(&server_block(&pki, ", handshake_first: true"));
    let first = NatsSecurity {
        tls_first: true,
        ..with_ca(&pki)
    };
    serves(&tls_url(&server), first).await;
}

#[tokio::test]
async fn missing_files_are_config_errors_that_name_the_variable() {
    let mut config = Config::default();
    config.nats_url = Some("nats://127.0.0.1:1".into());
    config.nats_security = NatsSecurity {
        creds_file: Some(Path::new("/nonexistent/app.creds").to_owned()),
        ..NatsSecurity::default()
    };
    let err = Client::connect_with(&config)
        .await
        .expect_err("missing creds file");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("NATS_CREDS"), "{err}");
}

/// Decentralized auth, built here without `nsc`: an operator, an account
/// and a user, each an nkey; JWTs signed with them; the server trusts the
/// operator and preloads the account; the user's `.creds` file holds its
/// JWT and seed.
mod jwt {
    fn base64url(data: &[u8]) -> String {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::with_capacity(data.len() * 4 / 3 + 3);
        for chunk in data.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    /// A JWT with `claims` (the `nats` part), signed by `issuer` about
    /// `subject`.
    pub fn sign(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
        let header = base64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let claims = serde_json::json!({
            "jti": catga::new_message_id(),
            "iat": now,
            "iss": issuer.public_key(),
            "name": name,
            "sub": subject,
            "nats": nats,
        });
        let body = base64url(claims.to_string().as_bytes());
        let signed = format!("{header}.{body}");
        let sig = issuer.sign(signed.as_bytes()).expect("sign");
        format!("{signed}.{}", base64url(&sig))
    }

    #[test]
    fn base64url_without_padding() {
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_with_decentralized_auth() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt::sign(
        &operator,
        &operator.public_key(),
        "catga-test-operator",
        serde_json::json!({ "type": "operator", "version": 2 }),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
    });
    let account_jwt = jwt::sign(
        &operator,
        &account.public_key(),
        "catga-test-account",
        serde_json::json!({ "limits": unlimited, "type": "account", "version": 2 }),
    );
    let user_jwt = jwt::sign(
        &account,
        &user.public_key(),
        "catga-test-user",
        serde_json::json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2
        }),
    );
    let seed = user.seed().expect("seed");
    let dir = tempfile::tempdir().expect("temp dir");
    let creds = dir.path().join("user.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .expect("write creds");
    // The system account may not have JetStream (the test servers run
    // with it): a second account, without JetStream limits.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt::sign(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({ "limits": { "subs": -1, "data": -1, "payload": -1, "imports": -1,
            "exports": -1, "wildcards": true, "conn": -1, "leaf": -1 }, "type": "account", "version": 2 }),
    );
    let server = NatsServer::start_with(&format!(
        "operator: \"{operator_jwt}\"\nsystem_account: \"{sys}\"\nresolver: MEMORY\n\
         resolver_preload: {{ {acc}: \"{account_jwt}\", {sys}: \"{system_jwt}\" }}\n",
        acc = account.public_key(),
        sys = system.public_key()
    ));
    let with_creds = NatsSecurity {
        creds_file: Some(creds.clone()),
        ..NatsSecurity::default()
    };
    serves(&server.url(), with_creds).await;

    // A user of another account the server does not know is refused.
    let stranger = nkeys::KeyPair::new_account();
    let other_user = nkeys::KeyPair::new_user();
    let other_jwt = jwt::sign(
        &stranger,
        &other_user.public_key(),
        "stranger",
        serde_json::json!({ "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2 }),
    );
    let other_seed = other_user.seed().expect("seed");
    let other_creds = dir.path().join("stranger.creds");
    std::fs::write(
        &other_creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{other_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{other_seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .expect("write creds");
    let texts = refused(
        &server.url(),
        NatsSecurity {
            creds_file: Some(other_creds),
            ..NatsSecurity::default()
        },
        ErrorKind::Unauthorized,
        "refused the credentials",
    )
    .await;
    assert_hidden(&seed, &texts);
    assert_hidden(&other_seed, &texts);
}

// ---- Redis ----

/// A runtime on the embedded bus that keeps its state in Redis at `url`
/// (or in the master named `mymaster` by the sentinel at `url`).
async fn redis_runtime(url: &str, tls: RedisTls, sentinel: bool) -> Runtime {
    let _ = log();
    let b = Runtime::builder();
    let b = if sentinel {
        b.redis_sentinel(&[url], "mymaster")
    } else {
        b.redis_url(url)
    };
    b.redis_tls(tls)
        .instance_id("secured-redis")
        .handlers(|s| s.name() == "secured::remember")
        .start()
        .await
        .expect("start-up itself succeeds")
}

/// The runtime gets in: it becomes ready and its state lives in Redis.
async fn redis_serves(url: &str, tls: RedisTls) {
    serves_state(redis_runtime(url, tls, false).await).await;
}

/// `rt` becomes ready and keeps its state in its store.
async fn serves_state(rt: Runtime) {
    catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
    let client = rt.client();
    let key = catga_tests::run_id();
    assert_eq!(
        client.send(Remember { key: key.clone() }).await.expect("served"),
        1
    );
    assert_eq!(client.send(Remember { key }).await.expect("served"), 2);
    rt.shutdown().await.expect("clean shutdown");
}

/// The runtime stays not ready, saying `why`; a command that needs the
/// store fails with a retryable "unavailable" (the sender did nothing
/// wrong) whose text shows neither the reason nor a secret. Returns the
/// texts it saw.
async fn redis_refused(url: &str, tls: RedisTls, why: &str) -> Vec<String> {
    refused_state(redis_runtime(url, tls, false).await, why).await
}

/// See [`redis_refused`].
async fn refused_state(rt: Runtime, why: &str) -> Vec<String> {
    let started = Instant::now();
    let mut readiness = rt.readiness();
    while started.elapsed() < Duration::from_secs(5) {
        readiness = rt.readiness();
        if readiness.failing.iter().any(|f| f.contains(why)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!readiness.ready);
    assert!(
        readiness.failing.iter().any(|f| f.contains(why)),
        "readiness says why: {readiness:?}"
    );
    let err = rt
        .client()
        .send(Remember { key: "k".into() })
        .await
        .expect_err("no store");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable());
    let _ = rt.shutdown().await;
    let mut texts = readiness.failing;
    texts.push(err.to_string());
    texts
}

fn redis_url(server: &RedisServer, userinfo: &str) -> String {
    format!("redis://{userinfo}127.0.0.1:{}/", server.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_password_in_the_url() {
    let password = "redis-s3cr3t-pw";
    let server = RedisServer::start_with(false, &["--requirepass", password]);
    redis_serves(&redis_url(&server, &format!(":{password}@")), RedisTls::default()).await;
    let texts = redis_refused(
        &redis_url(&server, ":not-the-password-0x@"),
        RedisTls::default(),
        "Redis refused the credentials",
    )
    .await;
    assert_hidden("not-the-password-0x", &texts);
    assert_hidden(password, &texts);
    let texts = redis_refused(
        &redis_url(&server, ""),
        RedisTls::default(),
        "Redis refused the credentials",
    )
    .await;
    assert_hidden(password, &texts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_acl_user() {
    let server = RedisServer::start_with(
        false,
        &[
            "--user",
            "default",
            "off",
            "--user",
            "orders",
            "on",
            ">orders-s3cr3t",
            "~catga:*",
            "&*",
            "+@all",
        ],
    );
    redis_serves(&redis_url(&server, "orders:orders-s3cr3t@"), RedisTls::default()).await;
    let texts = redis_refused(
        &redis_url(&server, "orders:wrong-s3cr3t@"),
        RedisTls::default(),
        "Redis refused the credentials",
    )
    .await;
    assert_hidden("wrong-s3cr3t", &texts);
    assert_hidden("orders-s3cr3t", &texts);
}

fn redis_tls_server(pki: &Pki, clients: &str) -> RedisServer {
    RedisServer::start_tls(
        &pki.path("ca.pem"),
        &pki.path("server.pem"),
        &pki.path("server-key.pem"),
        clients,
        &[],
    )
}

fn rediss_url(server: &RedisServer) -> String {
    format!("rediss://127.0.0.1:{}/", server.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tls_with_a_custom_ca() {
    let pki = Pki::new(false);
    let server = redis_tls_server(&pki, "no");
    let with_ca = RedisTls {
        ca: Some(pki.path("ca.pem")),
        ..RedisTls::default()
    };
    redis_serves(&rediss_url(&server), with_ca).await;
    // Without the CA the server's certificate is not trusted.
    redis_refused(&rediss_url(&server), RedisTls::default(), "TLS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mutual_tls() {
    let pki = Pki::new(false);
    let server = redis_tls_server(&pki, "yes");
    let mutual = RedisTls {
        ca: Some(pki.path("ca.pem")),
        cert: Some(pki.path("client.pem")),
        key: Some(pki.path("client-key.pem")),
    };
    redis_serves(&rediss_url(&server), mutual).await;
    let ca_only = RedisTls {
        ca: Some(pki.path("ca.pem")),
        ..RedisTls::default()
    };
    redis_refused(&rediss_url(&server), ca_only, "TLS").await;
}

/// Sentinel with TLS and client certificates: `REDIS_TLS_*` reach the
/// sentinel and the master it names (both ask for a client certificate).
/// Without the client certificate the handshake is refused, and
/// readiness says it is TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_with_mutual_tls() {
    let pki = Pki::new(false);
    let (_master, sentinel) = catga_tests::RedisSentinel::start_tls(
        &pki.path("ca.pem"),
        &pki.path("server.pem"),
        &pki.path("server-key.pem"),
        "yes",
    );
    let mutual = RedisTls {
        ca: Some(pki.path("ca.pem")),
        cert: Some(pki.path("client.pem")),
        key: Some(pki.path("client-key.pem")),
    };
    serves_state(redis_runtime(&sentinel.url(), mutual, true).await).await;
    let ca_only = RedisTls {
        ca: Some(pki.path("ca.pem")),
        ..RedisTls::default()
    };
    refused_state(redis_runtime(&sentinel.url(), ca_only, true).await, "TLS").await;
}
