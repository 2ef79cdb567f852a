//! Static validation of `deploy/`: the compose file, the Kubernetes
//! manifests and the Dockerfile are parsed and checked against the code.
//! No container engine runs here, so this is what "validated" means:
//!
//! - every probe and health check asks a route the HTTP endpoint serves
//!   (a runtime is started and each path is requested) on the port of
//!   `CATGA_HTTP_ADDR`;
//! - every environment variable is one catga reads (`catga::SETTINGS`) or
//!   one of the example's own;
//! - the grace periods cover the drain deadline;
//! - the NATS nodes form one cluster with JetStream, and the replicas know
//!   every node;
//! - selectors match the pod labels; the image runs as non-root.

use std::collections::BTreeSet;
use std::path::PathBuf;

use yaml_rust2::{Yaml, YamlLoader};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

fn one(path: &str) -> Yaml {
    let mut docs = load(path);
    assert_eq!(docs.len(), 1, "{path}: one document");
    docs.remove(0)
}

fn s<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {y:?}"))
}

fn list<'a>(y: &'a Yaml, what: &str) -> &'a [Yaml] {
    y.as_vec()
        .unwrap_or_else(|| panic!("{what} is not a list: {y:?}"))
}

fn strings(y: &Yaml, what: &str) -> Vec<String> {
    list(y, what).iter().map(|v| s(v, what).to_owned()).collect()
}

/// Variables the example reads besides catga's.
const EXAMPLE_VARIABLES: [&str; 4] = [
    "ORDER_DEMO",
    "ORDER_DEMO_ORDERS",
    "ORDER_DEMO_INTERVAL_MS",
    "ORDER_COURIER_REFUSALS",
];

fn known_variable(name: &str) -> bool {
    catga::SETTINGS.iter().any(|s| s.name == name) || EXAMPLE_VARIABLES.contains(&name)
}

/// The port of a `host:port` address.
fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// Every path starts a 200 or 503 answer (a route), not a 404, from a
/// real runtime's endpoint.
async fn assert_routes(paths: &BTreeSet<String>) {
    let rt = catga::Runtime::builder()
        .memory(catga::MemoryBus::new())
        .http_addr("127.0.0.1:0")
        .client_only()
        .start()
        .await
        .expect("runtime");
    let addr = rt.http_addr().expect("endpoint");
    for path in paths.clone() {
        let (status, body) = tokio::task::spawn_blocking(move || catga_tests::http::get(addr, &path))
            .await
            .expect("GET");
        assert!(
            status == 200 || status == 503,
            "probe path answers {status}: {body}"
        );
    }
    rt.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_file_matches_the_code() {
    let doc = one("compose.yaml");
    let services = &doc["services"];
    let names: Vec<String> = services
        .as_hash()
        .expect("services")
        .keys()
        .map(|k| s(k, "service name").to_owned())
        .collect();

    // Three NATS nodes, one cluster, JetStream, each routing to the others.
    let mut client_ports = Vec::new();
    for i in 1..=3 {
        let name = format!("nats{i}");
        let cmd = strings(&services[name.as_str()]["command"], "nats command");
        let arg = |flag: &str| {
            cmd.iter()
                .position(|a| a == flag)
                .and_then(|p| cmd.get(p + 1))
                .unwrap_or_else(|| panic!("{name}: no {flag}"))
                .clone()
        };
        assert!(cmd.iter().any(|a| a == "--jetstream"), "{name}: JetStream");
        assert_eq!(arg("--cluster_name"), "catga");
        let routes = arg("--routes");
        for j in (1..=3).filter(|j| *j != i) {
            assert!(
                routes.contains(&format!("nats{j}:6222")),
                "{name} routes to nats{j}: {routes}"
            );
        }
        client_ports.push(arg("--port"));
    }

    // Three Redis Cluster masters that keep serving while one is down.
    let masters: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("redis") && n[5..].parse::<u8>().is_ok())
        .collect();
    assert_eq!(masters.len(), 3, "{names:?}");
    for master in &masters {
        let cmd = strings(&services[master.as_str()]["command"], "redis command");
        let arg = |flag: &str| cmd.iter().position(|a| a == flag).and_then(|p| cmd.get(p + 1));
        assert_eq!(
            arg("--cluster-enabled").map(String::as_str),
            Some("yes"),
            "{master}"
        );
        assert_eq!(
            arg("--cluster-require-full-coverage").map(String::as_str),
            Some("no"),
            "{master}"
        );
        assert_eq!(arg("--cluster-announce-hostname"), Some(*master), "{master}");
    }
    let init = strings(&services["redis-init"]["command"], "redis-init command").join("\n");
    for master in &masters {
        assert!(
            init.contains(master.as_str()),
            "redis-init joins {master}: {init}"
        );
    }
    assert!(init.contains("--cluster create"), "{init}");

    let replicas: Vec<&String> = names.iter().filter(|n| n.starts_with("orders")).collect();
    assert_eq!(replicas.len(), 3, "{names:?}");
    let mut probe_paths = BTreeSet::new();
    for name in replicas {
        let svc = &services[name.as_str()];
        let env = svc["environment"].as_hash().expect("environment");
        let var = |k: &str| s(&env[&Yaml::String(k.to_owned())], k).to_owned();
        for key in env.keys() {
            let key = s(key, "variable");
            assert!(
                known_variable(key),
                "{name}: {key} is not a variable catga or the example reads"
            );
        }
        let nats_url = var("NATS_URL");
        for (i, port) in client_ports.iter().enumerate() {
            assert!(
                nats_url.contains(&format!("nats{}:{port}", i + 1)),
                "{name} knows nats{}: {nats_url}",
                i + 1
            );
        }
        // The service's keys in one store shard per master of the Redis
        // Cluster, which redis-init has formed before the replicas start.
        let redis_url = var("REDIS_URL");
        for master in &masters {
            assert!(
                redis_url.contains(&format!("{master}:6379")),
                "{name}: {redis_url}"
            );
        }
        assert_eq!(var("CATGA_REDIS_MODE"), "cluster");
        assert_eq!(var("CATGA_STORE_SHARDS"), masters.len().to_string());
        let after = &svc["depends_on"]["redis-init"]["condition"];
        assert_eq!(
            s(after, "depends_on redis-init"),
            "service_completed_successfully",
            "{name}"
        );
        assert_eq!(var("CATGA_JS_REPLICAS"), "3", "streams survive a node");
        let http_port = port_of(&var("CATGA_HTTP_ADDR"));
        let test = strings(&svc["healthcheck"]["test"], "healthcheck");
        assert_eq!(
            test[..4],
            [
                "CMD".to_owned(),
                "/usr/local/bin/order-system".to_owned(),
                "probe".to_owned(),
                format!("127.0.0.1:{http_port}")
            ],
            "{name}: {test:?}"
        );
        probe_paths.insert(test[4].clone());
        let published = strings(&svc["ports"], "ports");
        assert!(
            published.iter().all(|p| p.ends_with(&format!(":{http_port}"))),
            "{name}: {published:?}"
        );
        let grace = s(&svc["stop_grace_period"], "stop_grace_period");
        let grace: u64 = grace.trim_end_matches('s').parse().expect("seconds");
        let drain: u64 = var("CATGA_DRAIN_TIMEOUT_MS").parse().expect("ms");
        assert!(
            grace * 1000 > drain,
            "{name}: {grace}s must cover the {drain} ms drain"
        );
        assert_eq!(s(&svc["image"], "image"), "catga/order-system");
    }
    let load = strings(&services["load"]["command"], "load command");
    assert_eq!(load[0], "load", "a subcommand the binary has");
    assert_routes(&probe_paths).await;
}

#[test]
fn dockerfile_builds_small_and_runs_as_non_root() {
    let text = std::fs::read_to_string(deploy("Dockerfile")).expect("Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let from: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 2, "multi-stage: {from:?}");
    assert!(
        from[1].contains("distroless"),
        "a small runtime image: {}",
        from[1]
    );
    let user = lines.iter().find(|l| l.starts_with("USER ")).expect("a USER");
    assert!(
        !user.contains("root") && !user.ends_with(" 0") && !user.contains(" 0:"),
        "{user}"
    );
    let copied = lines
        .iter()
        .find(|l| l.starts_with("COPY --from=build"))
        .and_then(|l| l.split_whitespace().last())
        .expect("the binary is copied");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT") && l.contains(copied)),
        "the entry point is the copied binary"
    );
    assert!(text.contains("-p order-system") && text.contains("--locked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_manifests_match_the_code() {
    let deployment = one("k8s/deployment.yaml");
    let config = one("k8s/configmap.yaml");
    let secret = one("k8s/secret.example.yaml");
    let service = one("k8s/service.yaml");
    let pdb = one("k8s/pdb.yaml");
    assert_eq!(s(&deployment["kind"], "kind"), "Deployment");
    let spec = &deployment["spec"];
    let replicas = spec["replicas"].as_i64().expect("replicas");
    assert_eq!(replicas, 3);
    let pod = &spec["template"];
    let labels = pod["metadata"]["labels"].as_hash().expect("pod labels").clone();
    let matches = |selector: &Yaml, what: &str| {
        let sel = selector.as_hash().unwrap_or_else(|| panic!("{what}: selector"));
        assert!(!sel.is_empty(), "{what}: selector");
        for (k, v) in sel {
            assert_eq!(labels.get(k), Some(v), "{what}: selects the pods");
        }
    };
    matches(&spec["selector"]["matchLabels"], "Deployment");
    matches(&service["spec"]["selector"], "Service");
    matches(&pdb["spec"]["selector"]["matchLabels"], "PodDisruptionBudget");
    assert!(pdb["spec"]["minAvailable"].as_i64().expect("minAvailable") < replicas);

    let data = config["data"].as_hash().expect("ConfigMap data");
    for key in data
        .keys()
        .chain(secret["stringData"].as_hash().expect("Secret data").keys())
    {
        let key = s(key, "variable");
        assert!(
            known_variable(key),
            "{key} is not a variable catga or the example reads"
        );
    }
    let setting = |k: &str| s(&config["data"][k], k).to_owned();
    let http_port = i64::from(port_of(&setting("CATGA_HTTP_ADDR")));
    assert_eq!(setting("CATGA_JS_REPLICAS"), "3");

    let podspec = &pod["spec"];
    assert_eq!(podspec["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let containers = list(&podspec["containers"], "containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let ports = list(&c["ports"], "ports");
    let http = ports
        .iter()
        .find(|p| p["name"].as_str() == Some("http"))
        .expect("a port named http");
    assert_eq!(
        http["containerPort"].as_i64(),
        Some(http_port),
        "the port of CATGA_HTTP_ADDR"
    );
    assert_eq!(
        s(&service["spec"]["ports"][0]["targetPort"], "targetPort"),
        "http"
    );
    for from in list(&c["envFrom"], "envFrom") {
        if let Some(name) = from["configMapRef"]["name"].as_str() {
            assert_eq!(name, s(&config["metadata"]["name"], "ConfigMap name"));
        }
        if let Some(name) = from["secretRef"]["name"].as_str() {
            assert_eq!(name, s(&secret["metadata"]["name"], "Secret name"));
        }
    }
    for e in list(&c["env"], "env") {
        assert!(known_variable(s(&e["name"], "env name")));
    }
    let mut paths = BTreeSet::new();
    for (probe, expected) in [
        ("startupProbe", "/ready"),
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/health"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(s(&get["path"], probe), expected, "{probe}");
        assert_eq!(s(&get["port"], probe), "http", "{probe}");
        paths.insert(expected.to_owned());
    }
    assert!(c["resources"]["requests"]["cpu"].as_str().is_some());
    assert!(c["resources"]["limits"]["memory"].as_str().is_some());
    let pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .expect("preStop sleep");
    let drain_s = setting("CATGA_DRAIN_TIMEOUT_MS").parse::<i64>().expect("ms") / 1000;
    let grace = podspec["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace period");
    assert!(
        grace > pause + drain_s,
        "grace {grace}s must cover the preStop pause {pause}s and the {drain_s}s drain"
    );
    assert_routes(&paths).await;

    // The Helm values parse, and the NATS ones ask for a 3-node JetStream
    // cluster.
    let nats = one("k8s/nats-values.yaml");
    assert_eq!(nats["config"]["cluster"]["replicas"].as_i64(), Some(3));
    assert_eq!(nats["config"]["jetstream"]["enabled"].as_bool(), Some(true));
    assert!(!load("k8s/redis-values.yaml").is_empty());

    // The service runs on the Redis Cluster of the values, one store
    // shard per master.
    let redis = one("k8s/redis-cluster-values.yaml");
    let nodes = redis["cluster"]["nodes"].as_i64().expect("cluster.nodes");
    let per_master = 1 + redis["cluster"]["replicas"].as_i64().expect("cluster.replicas");
    assert_eq!(setting("CATGA_REDIS_MODE"), "cluster");
    assert_eq!(
        setting("CATGA_STORE_SHARDS").parse::<i64>().expect("shards"),
        nodes / per_master,
        "one store shard per master"
    );
    assert!(
        s(&redis["redis"]["configmap"], "redis.configmap").contains("cluster-require-full-coverage no"),
        "a failed master stops only its shard"
    );
    let url = s(&secret["stringData"]["REDIS_URL"], "REDIS_URL");
    assert!(url.contains("redis-cluster.redis.svc"), "{url}");
}
