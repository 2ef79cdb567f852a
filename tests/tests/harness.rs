//! The server harness itself: servers start on free ports, die when killed
//! and come back on the same port.

use catga_tests::servers::ping_redis;
use catga_tests::{NatsServer, RedisServer};

#[test]
fn redis_server_starts_stops_and_restarts() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    assert!(ping_redis(port));
    redis.kill();
    assert!(!ping_redis(port), "killed means gone");
    redis.resume();
    assert!(ping_redis(port), "back on the same port");
}

#[test]
fn nats_servers_get_distinct_free_ports() {
    let a = NatsServer::start();
    let b = NatsServer::start();
    assert_ne!(a.url(), b.url());
    let addr = a.url().trim_start_matches("nats://").to_owned();
    std::net::TcpStream::connect(addr).expect("accepts connections");
}
