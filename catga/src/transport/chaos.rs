//! Faults an embedded bus injects for the fault simulator
//! (`catga::testing::Simulation`): only those a real NATS deployment can
//! cause, each decided from the simulation's seed and the message it
//! falls on.
//!
//! A decision is a hash of the seed, the kind of fault, the message (its
//! message id, or its subject and payload when it has none) and how many
//! times this message met this kind of fault before. It does not depend
//! on the order in which tasks ran: the same seed loses the same
//! requests, replies, copies and acks of the same messages, however the
//! threads interleave. Off (one atomic load) unless a simulation turned
//! it on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use async_nats::HeaderMap;
use tokio::sync::oneshot;

use super::Reply;
use crate::wire::headers;

/// A kind of fault the bus can inject: what is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// A request is lost on its way: no handler sees it, the sender
    /// times out (a broker restarting, a connection cut).
    Request,
    /// A handler's reply is lost: the handler ran, the sender times out.
    Reply,
    /// One subscriber's copy of a core (not durable) message is lost: core
    /// NATS is at most once.
    Copy,
    /// A durable delivery is lost on its way to the consumer: redelivered
    /// when its ack wait passes, after messages stored later.
    Delivery,
    /// A durable consumer's ack is lost: the handled message is delivered
    /// again when its ack wait passes.
    Ack,
}

impl Fault {
    /// Every kind, in the order [`Rates`] and the counts list them.
    pub(crate) const ALL: [Fault; 5] = [
        Fault::Request,
        Fault::Reply,
        Fault::Copy,
        Fault::Delivery,
        Fault::Ack,
    ];

    fn index(self) -> usize {
        match self {
            Fault::Request => 0,
            Fault::Reply => 1,
            Fault::Copy => 2,
            Fault::Delivery => 3,
            Fault::Ack => 4,
        }
    }
}

/// How often each kind of fault strikes, in parts per million of the
/// chances it has.
pub(crate) type Rates = [u32; 5];

/// The faults of one bus (see the [module](self)).
pub(crate) struct Chaos {
    seed: u64,
    rates: Rates,
    on: AtomicBool,
    /// How many times each message met each kind of fault so far.
    met: Mutex<HashMap<(usize, u64), u64>>,
    struck: [AtomicU64; 5],
    /// What struck, as a sum of a hash per (kind, message, time it met
    /// it): the same in two runs when the same faults fell on the same
    /// messages, whatever the order.
    fingerprint: AtomicU64,
    /// The reply slots of requests whose reply was lost: kept, so that
    /// their senders time out as over NATS instead of hearing at once
    /// that the handler went away.
    lost_replies: Mutex<Vec<oneshot::Sender<Reply>>>,
}

impl Chaos {
    pub(crate) fn new(seed: u64, rates: Rates) -> Chaos {
        Chaos {
            seed,
            rates,
            on: AtomicBool::new(true),
            met: Mutex::new(HashMap::new()),
            struck: Default::default(),
            fingerprint: AtomicU64::new(0),
            lost_replies: Mutex::new(Vec::new()),
        }
    }

    /// Turns the faults on or off (the network heals).
    pub(crate) fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
        if !on {
            self.lost_replies
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    /// Whether `fault` strikes the message whose key is `key` this time.
    pub(crate) fn strikes(&self, fault: Fault, key: u64) -> bool {
        let rate = self.rates[fault.index()];
        if rate == 0 || !self.on.load(Ordering::Relaxed) {
            return false;
        }
        let nth = {
            let mut met = self.met.lock().unwrap_or_else(PoisonError::into_inner);
            let n = met.entry((fault.index(), key)).or_insert(0);
            *n += 1;
            *n
        };
        let roll = mix(mix(mix(self.seed ^ key) ^ fault.index() as u64) ^ nth);
        let hit = roll % 1_000_000 < u64::from(rate);
        if hit {
            self.struck[fault.index()].fetch_add(1, Ordering::Relaxed);
            self.fingerprint.fetch_add(roll, Ordering::Relaxed);
        }
        hit
    }

    /// How many times each kind struck so far.
    pub(crate) fn struck(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.struck[i].load(Ordering::Relaxed))
    }

    /// The fingerprint of what struck so far (see `fingerprint`).
    pub(crate) fn fingerprint(&self) -> u64 {
        self.fingerprint.load(Ordering::Relaxed)
    }

    /// Keeps the reply slot of a request whose reply was lost.
    pub(crate) fn lose_reply(&self, tx: oneshot::Sender<Reply>) {
        self.lost_replies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
    }
}

/// What identifies a message across its sends: its message id, or its
/// subject and payload. `salt` tells apart the copies of one message
/// (one per subscriber).
pub(crate) fn key_of(subject: &str, headers: Option<&HeaderMap>, payload: &[u8], salt: u64) -> u64 {
    let mut h = Fnv::default();
    h.write(subject.as_bytes());
    match headers.and_then(|h| h.get(headers::MESSAGE_ID)) {
        Some(id) => h.write(id.as_str().as_bytes()),
        None => h.write(payload),
    }
    mix(h.0 ^ salt)
}

/// FNV-1a: fixed, so that a key is the same in every run (std's hasher
/// is seeded per process).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

/// SplitMix64's finaliser: spreads every input bit over the output.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_depend_on_the_seed_and_the_message_not_the_order() {
        let rates = [200_000; 5];
        let keys: Vec<u64> = (0..200).map(|i| key_of("s", None, &[i as u8, 7], 0)).collect();
        let run = |seed: u64, order: &mut dyn Iterator<Item = &u64>| {
            let chaos = Chaos::new(seed, rates);
            let mut out: Vec<(u64, bool)> = order.map(|k| (*k, chaos.strikes(Fault::Ack, *k))).collect();
            out.sort_unstable();
            out
        };
        let forward = run(7, &mut keys.iter());
        let backward = run(7, &mut keys.iter().rev());
        assert_eq!(forward, backward, "the order of the messages does not matter");
        let other = run(8, &mut keys.iter());
        assert_ne!(forward, other, "another seed, other faults");
        let hits = forward.iter().filter(|(_, h)| *h).count();
        assert!((20..=60).contains(&hits), "about a fifth strike: {hits}");
    }

    #[test]
    fn a_message_sent_again_gets_a_new_chance_and_off_means_none() {
        let chaos = Chaos::new(1, [1_000_000, 0, 0, 0, 0]);
        let k = key_of("s", None, b"x", 0);
        assert!(chaos.strikes(Fault::Request, k));
        assert!(!chaos.strikes(Fault::Reply, k), "a kind at rate 0 never strikes");
        chaos.set_on(false);
        assert!(!chaos.strikes(Fault::Request, k));
        assert_eq!(chaos.struck(), [1, 0, 0, 0, 0]);
        let half = Chaos::new(3, [500_000, 0, 0, 0, 0]);
        let tries: Vec<bool> = (0..64).map(|_| half.strikes(Fault::Request, k)).collect();
        assert!(
            tries.contains(&true) && tries.contains(&false),
            "each send rolls again"
        );
    }
}
