//! Real servers for tests: spawned on a free loopback port in a temporary
//! directory, waited for until they answer, killed on drop.
//!
//! A missing binary fails the test with a message naming `scripts/test`,
//! which installs the servers; nothing is ever skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Finds a server binary: `$env_var`, then `PATH`, then the sbin folders
/// Debian installs daemons into.
fn find_binary(name: &str, env_var: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_var) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env_var}={} is not a file", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs =
        std::env::split_paths(&path).chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` was not found on PATH (nor in {env_var}). The integration tests need a real \
         {name}: run the tests with `scripts/test`, which installs it, or install it yourself."
    );
}

/// A base port whose `n` successors are free right now, below the
/// ephemeral range (32768 and up on Linux), for scripts that take a range
/// of ports: the other tests' servers take free ports from that range,
/// and one of them once took a port of a script's range between the
/// check and the script's start.
pub fn free_port_range(n: u16) -> u16 {
    for _ in 0..200 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let base = 20_000 + (std::process::id() as u16 % 200) * 30 + (nanos % 6_000) as u16;
        if (1..=n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free range of {n} ports");
}

/// Whether process `pid` runs (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// A server process on a fixed port and directory, restartable.
struct Process {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Process {
    fn new(name: &str, env_var: &str) -> Process {
        Process {
            binary: find_binary(name, env_var),
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        }
    }

    /// Spawns the binary with `args` (its log in the directory) and waits
    /// until `ready(port)`.
    fn spawn(&mut self, args: &[std::ffi::OsString], ready: impl FnMut(u16) -> bool) {
        assert!(
            self.child.is_none(),
            "{} is already running",
            self.binary.display()
        );
        // Appended to: a server killed and started again keeps the log of
        // its earlier runs, for the test that fails after a restart.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("log file");
        let log2 = log.try_clone().expect("log file");
        let child = Command::new(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        let mut ready = ready;
        let port = self.port;
        let log = self.dir.path().join("server.log");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if ready(port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} did not become ready within 10 s; its log:\n{}",
            self.binary.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            let status = Command::new("kill")
                .args([format!("-{signal}"), c.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{signal} failed");
            if signal == "STOP" {
                wait_stopped(c.id());
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (up to 2 s) until every thread of process `pid` is stopped:
/// `kill -STOP` returns once the signal is sent, and a busy
/// multi-threaded nats-server was seen answering a request sent right
/// after it. Where `/proc` cannot be read, it waits 50 ms.
fn wait_stopped(pid: u32) {
    let until = Instant::now() + Duration::from_secs(2);
    let tasks = format!("/proc/{pid}/task");
    let all_stopped = || -> Option<bool> {
        let mut any = false;
        for task in std::fs::read_dir(&tasks).ok()? {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            // "pid (comm) S ...": the state follows the last ')'.
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            if state != 'T' && state != 't' {
                return Some(false);
            }
            any = true;
        }
        Some(any)
    };
    loop {
        match all_stopped() {
            Some(true) => return,
            None => {
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
            Some(false) if Instant::now() >= until => {
                panic!("process {pid} did not stop within 2 s of SIGSTOP")
            }
            Some(false) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `nats-server` with JetStream, on a free loopback port.
pub struct NatsServer {
    process: Process,
    /// Extra configuration (nats-server's config file syntax), if any.
    config: Option<String>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts clients.
    pub fn start() -> NatsServer {
        let mut s = NatsServer::reserve();
        s.resume();
        s
    }

    /// Starts a server with extra configuration in nats-server's config
    /// syntax (authorization, limits, ...) and waits until it accepts
    /// clients.
    pub fn start_with(config: &str) -> NatsServer {
        let mut s = NatsServer::reserve();
        s.config = Some(config.to_owned());
        s.resume();
        s
    }

    /// Picks the port and directory without starting the server (to test a
    /// runtime that starts while NATS is down); [`resume`](Self::resume)
    /// starts it.
    pub fn reserve() -> NatsServer {
        NatsServer {
            process: Process::new("nats-server", "CATGA_NATS_SERVER"),
            config: None,
        }
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.process.port)
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.process.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is
    /// read or answered, as with a server stuck or cut off by the network.
    pub fn pause(&self) {
        self.process.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT); it then handles what its
    /// clients sent meanwhile.
    pub fn unpause(&self) {
        self.process.signal("CONT");
    }

    /// Starts (again) on the same port and directory and waits until ready.
    pub fn resume(&mut self) {
        let mut args: Vec<std::ffi::OsString> = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.process.port.to_string().into(),
            "-js".into(),
            "-sd".into(),
            self.process.dir.path().join("js").into(),
        ];
        let mut ready: fn(u16) -> bool = nats_answers;
        if let Some(config) = &self.config {
            let path = self.process.dir.path().join("server.conf");
            std::fs::write(&path, config).expect("write nats-server config");
            args.push("-c".into());
            args.push(path.into());
            // A TLS-first server greets only after a TLS handshake.
            if config.contains("handshake_first") {
                ready = accepts_tcp;
            }
        }
        self.process.spawn(&args, ready);
    }
}

/// Three `nats-server`s with JetStream in one cluster (routes on
/// loopback), each on its own free client port.
pub struct NatsCluster {
    /// The nodes, in order; kill and resume them one by one.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts the three nodes and waits until each accepts clients (the
    /// JetStream meta group elects its leader a moment later; clients that
    /// create streams retry until it has).
    pub fn start() -> NatsCluster {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes: Vec<NatsServer> = (0..3).map(|_| NatsServer::reserve()).collect();
        for (i, node) in nodes.iter_mut().enumerate() {
            let others: Vec<String> = routes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            node.config = Some(format!(
                "server_name: n{i}\ncluster {{\n  name: catga\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                routes[i],
                others.join(", ")
            ));
        }
        for node in &mut nodes {
            node.resume();
        }
        NatsCluster { nodes }
    }

    /// Every node's client URL, comma separated (as `NATS_URL` takes them).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for NatsCluster {
    /// A test that failed with the cluster up prints the end of each
    /// node's log (all its runs): what the nodes said while a stream went
    /// missing or a leader was not elected is the only trace of it.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, n) in self.nodes.iter().enumerate() {
                eprintln!("---- node {i}'s log, last lines ----\n{}", n.log_tail(200));
            }
        }
    }
}

/// True when something accepts TCP connections on `port`.
fn accepts_tcp(port: u16) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The directory the server keeps its files in (config, log, JetStream).
impl NatsServer {
    /// The last `lines` lines of the server's log (all its runs).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir().join("server.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Where a test may put files the server reads (certificates).
    pub fn dir(&self) -> &std::path::Path {
        self.process.dir.path()
    }
}

/// True when a NATS server on `port` greets with `INFO`.
fn nats_answers(port: u16) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ")
}

/// A `redis-server` on a free loopback port: without persistence, or with
/// an append-only file synced on every write (to survive being killed).
pub struct RedisServer {
    process: Process,
    persistent: bool,
    extra: Vec<String>,
}

impl RedisServer {
    /// Freezes the server (SIGSTOP): commands wait, keys' times to live
    /// run on, as with a server stuck.
    pub fn pause(&self) {
        self.process.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn unpause(&self) {
        self.process.signal("CONT");
    }

    /// Starts a server without persistence and waits until it answers
    /// `PING`.
    pub fn start() -> RedisServer {
        RedisServer::start_with(false, &[])
    }

    /// Starts a server that writes every change to its append-only file
    /// before answering, so that a SIGKILL loses nothing.
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_with(true, &[])
    }

    /// Starts a server with extra `redis-server` arguments (`--requirepass`,
    /// TLS settings, ...). `ready` must then be checked by the caller if
    /// the arguments change how it answers `PING` (see [`resume_with`]).
    pub fn start_with(persistent: bool, extra: &[&str]) -> RedisServer {
        let mut s = RedisServer {
            process: Process::new("redis-server", "CATGA_REDIS_SERVER"),
            persistent,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        s.resume();
        s
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.process.port)
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// Where it keeps its files.
    pub fn dir(&self) -> &std::path::Path {
        self.process.dir.path()
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts one on TLS only, with the server certificate and key `cert`
    /// and `key` issued by `ca`; `clients`: `tls-auth-clients` (`yes` asks
    /// clients for a certificate of `ca`); `more` arguments after those.
    pub fn start_tls(ca: &Path, cert: &Path, key: &Path, clients: &str, more: &[&str]) -> RedisServer {
        let (ca, cert, key) = (
            ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string(),
        );
        let mut args = vec![
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            clients,
        ];
        args.extend_from_slice(more);
        RedisServer::start_with(false, &args)
    }

    /// Starts (again) on the same port and directory and waits until it
    /// accepts connections (and answers `PING` when it takes plain ones
    /// without a password).
    pub fn resume(&mut self) {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            self.process.dir.path().into(),
            "--save".into(),
            "".into(),
        ];
        if self.persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(Into::into));
        } else {
            args.extend(["--appendonly", "no"].map(Into::into));
        }
        let plain = self.extra.is_empty();
        let tls = self.extra.iter().any(|a| a.starts_with("--tls"));
        if tls {
            // A TLS server listens on its TLS port; the plain port is off.
            args.extend(["--port", "0", "--tls-port"].map(Into::into));
        } else {
            args.push("--port".into());
        }
        args.push(self.process.port.to_string().into());
        args.extend(self.extra.iter().map(Into::into));
        let ready: fn(u16) -> bool = if plain { ping_redis } else { accepts_tcp };
        self.process.spawn(&args, ready);
    }
}

/// Sends `PING` over the raw protocol; true on `+PONG`.
pub fn ping_redis(port: u16) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A Redis Cluster of three masters (no replicas, unless
/// [`start_replicated`](RedisCluster::start_replicated)) on loopback:
/// every slot assigned, `cluster_state:ok` on each node before it is
/// handed out.
pub struct RedisCluster {
    /// The nodes: the masters in the order their slots were assigned,
    /// then their replicas, if any.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers and joins them with
    /// `redis-cli --cluster create`.
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(&[])
    }

    /// A cluster whose masters keep serving their slots while another
    /// master is down (`cluster-require-full-coverage no`), as a cluster
    /// that spreads services over its masters is run.
    pub fn start_partial() -> RedisCluster {
        RedisCluster::start_with(&["--cluster-require-full-coverage", "no"])
    }

    /// Three masters with a replica each, which keep serving their slots
    /// while another master is down: a master that dies is replaced by its
    /// replica after `cluster-node-timeout` (2 s here), as in production.
    /// Replication is asynchronous: a write a master acknowledged just
    /// before it died may not have reached its replica.
    pub fn start_replicated() -> RedisCluster {
        let cluster = RedisCluster::start_nodes(6, &["--cluster-require-full-coverage", "no"]);
        // Every replica has its first copy of its master's data.
        let until = std::time::Instant::now() + Duration::from_secs(30);
        for n in &cluster.nodes[3..] {
            loop {
                let info = std::process::Command::new("redis-cli")
                    .args(["-p", &n.port().to_string(), "info", "replication"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if info.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < until,
                    "a replica did not sync: {info}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    fn start_with(more: &[&str]) -> RedisCluster {
        RedisCluster::start_nodes(3, more)
    }

    fn start_nodes(count: usize, more: &[&str]) -> RedisCluster {
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ];
        args.extend_from_slice(more);
        // Each node's cluster bus on a free port of its own: by default it
        // is the client port + 10000, which nothing checked was free (a
        // node failed to start on "Address already in use" once, with many
        // tests' servers starting in one process under plain `cargo test`).
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                let bus = free_port().to_string();
                let mut node = args.clone();
                node.extend(["--cluster-port", bus.as_str()]);
                RedisServer::start_with(true, &node)
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let replicas = if count > 3 { "1" } else { "0" };
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", replicas, "--cluster-yes"])
            .output()
            .expect("redis-cli (it comes with redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok();
        cluster
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        for n in &self.nodes {
            loop {
                let info = std::process::Command::new("redis-cli")
                    .args(["-p", &n.port().to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < until,
                    "the Redis cluster is not ok: {info}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The node that serves the slot of `key` (its index in `nodes`).
    pub fn owner_of(&self, key: &str) -> usize {
        let cli = |port: u16, args: &[&str]| -> String {
            std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .expect("redis-cli")
        };
        let slot = cli(self.nodes[0].port(), &["cluster", "keyslot", key]);
        let slot: u16 = slot.parse().unwrap_or_else(|_| panic!("keyslot answered {slot}"));
        for (i, n) in self.nodes.iter().enumerate() {
            let nodes = cli(n.port(), &["cluster", "nodes"]);
            let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
                continue;
            };
            // Fields 9 and on are the node's slots: `a-b` or `a`.
            let owns = me.split_whitespace().skip(8).any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
            });
            if owns {
                return i;
            }
        }
        panic!("no node owns slot {slot}");
    }
}

/// Redis with Sentinel on loopback: a master, a replica of it and one
/// sentinel that monitors it as `mymaster` (down after 1 s, so a test sees
/// a failover within a few seconds).
pub struct RedisSentinel {
    /// The master at start.
    pub master: RedisServer,
    /// Its replica, promoted when the master dies.
    pub replica: RedisServer,
    sentinel: Process,
}

impl RedisSentinel {
    /// Starts the three and waits until the sentinel knows the replica.
    pub fn start() -> RedisSentinel {
        // Redis waits 5 s before a first full sync by default, to gather
        // replicas: a test would kill the master before the replica has
        // anything.
        let master = RedisServer::start_with(true, &["--repl-diskless-sync-delay", "0"]);
        let replica =
            RedisServer::start_with(true, &["--replicaof", "127.0.0.1", &master.port().to_string()]);
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let info = Command::new("redis-cli")
                .args(["-p", &replica.port().to_string(), "info", "replication"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if info.contains("master_link_status:up") {
                break;
            }
            assert!(Instant::now() < until, "the replica did not sync: {info}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut sentinel = Process::new("redis-server", "CATGA_REDIS_SERVER");
        let conf = sentinel.dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 5000\nsentinel parallel-syncs mymaster 1\n",
                sentinel.port,
                sentinel.dir.path().display(),
                master.port()
            ),
        )
        .expect("sentinel.conf");
        sentinel.spawn(&[conf.into_os_string(), "--sentinel".into()], accepts_tcp);
        let s = RedisSentinel {
            master,
            replica,
            sentinel,
        };
        // The sentinel learns of the replica from the master's INFO.
        let until = Instant::now() + Duration::from_secs(20);
        while !s
            .sentinel_says("replicas", "mymaster")
            .contains(&s.replica.port().to_string())
        {
            assert!(Instant::now() < until, "the sentinel did not find the replica");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    /// The sentinel's URL (what `REDIS_URL` lists in Sentinel mode).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.sentinel.port)
    }

    /// A master and a sentinel monitoring it as `mymaster`, both on TLS
    /// only (`rediss://`), with the server certificate and key `cert` and
    /// `key` issued by `ca`; `clients`: `tls-auth-clients` (`yes` asks
    /// clients for a certificate of `ca`). The sentinel reaches the
    /// master over TLS too, with the same certificate. Returns the master
    /// and the sentinel's `rediss://` URL; both stop when dropped.
    pub fn start_tls(ca: &Path, cert: &Path, key: &Path, clients: &str) -> (RedisServer, TlsSentinel) {
        let master = RedisServer::start_tls(ca, cert, key, clients, &["--tls-replication", "yes"]);
        let (ca, cert, key) = (
            ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string(),
        );
        let mut sentinel = Process::new("redis-server", "CATGA_REDIS_SERVER");
        let conf = sentinel.dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {}\nbind 127.0.0.1\ndir {}\n\
                 tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n\
                 tls-auth-clients {clients}\ntls-replication yes\n\
                 sentinel monitor mymaster 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\n",
                sentinel.port,
                sentinel.dir.path().display(),
                master.port()
            ),
        )
        .expect("sentinel.conf");
        sentinel.spawn(&[conf.into_os_string(), "--sentinel".into()], accepts_tcp);
        (master, TlsSentinel { sentinel })
    }

    /// The port of the server the sentinel currently names master.
    pub fn master_port(&self) -> u16 {
        let out = self.sentinel_says("get-master-addr-by-name", "mymaster");
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no master address: {out}"))
    }

    fn sentinel_says(&self, what: &str, name: &str) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.sentinel.port.to_string(), "sentinel", what, name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

/// A sentinel on TLS only (see [`RedisSentinel::start_tls`]).
pub struct TlsSentinel {
    sentinel: Process,
}

impl TlsSentinel {
    /// The sentinel's `rediss://` URL.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.sentinel.port)
    }
}
