//! Store shards (`CATGA_STORE_SHARDS`): a service's keys split into a
//! fixed number of groups, each with its own Redis hash tag, so that a
//! Redis Cluster spreads one service over all its masters while every
//! atomic operation (a Lua script) still touches one slot.
//!
//! - With one shard (the default) every key is `catga:{<service>}:…`, the
//!   layout of earlier releases, byte for byte.
//! - With `n` shards, the data of shard `i` (states, inbox entries, the
//!   outbox stream, saga journals and their index, copies of lease fences,
//!   liveness keys) is under `catga:{<service>~<j>}:…`, where `j` is the
//!   first number that puts the tag's slot in the middle half of the
//!   `i`-th of `n` equal slot ranges: the shards fall on evenly spread
//!   slots, so that `n` shards on `n` masters (which Redis Cluster gives
//!   equal, contiguous ranges) land one on each master.
//! - Control keys (leases and their fences, members, dead-letter records,
//!   the shard count mark) stay under `catga:{<service>}`.
//! - A value's shard comes from its key: `xxh3(key) % n`, the hash keyed
//!   sagas use for partitions, so with `n` dividing the partition count a
//!   partition's keys without `{…}` are all in one shard (partitions hash
//!   the whole key). A key containing `{…}` is
//!   placed by the part inside the braces (as Redis places keys by their
//!   hash tag): `order-{acct-7}-line-3` is in the shard of `acct-7`, so an
//!   aggregate and its children commit together.

use xxhash_rust::xxh3::xxh3_64;

/// Redis Cluster's slot count.
const SLOTS: u32 = 16_384;

/// The part of a state key (or a message id) that places it in a store
/// shard (`CATGA_STORE_SHARDS`): the text inside its first `{…}` if that
/// is not empty, else the whole key. Keys with the same placing part are
/// in the same shard whatever the shard count, so a handler can save them
/// together: `order-{acct-7}-line-3` sits with `acct-7`.
///
/// ```
/// assert_eq!(catga::placing_part("order-{acct-7}-line-3"), "acct-7");
/// assert_eq!(catga::placing_part("acct-7"), "acct-7");
/// assert_eq!(catga::placing_part("a{}b"), "a{}b");
/// ```
pub fn placing_part(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// The shard of `key` among `shards`.
pub(crate) fn shard_of(key: &str, shards: u32) -> u32 {
    if shards <= 1 {
        return 0;
    }
    (xxh3_64(placing_part(key).as_bytes()) % u64::from(shards)) as u32
}

/// Redis Cluster's slot of a hash tag: CRC16 (XMODEM) modulo 16,384.
pub(crate) fn slot(tag: &str) -> u32 {
    let mut crc: u16 = 0;
    for b in tag.bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    u32::from(crc) % SLOTS
}

/// The key prefix (`catga:{tag}`) of each of `shards` shards of
/// `service`, in shard order.
pub(crate) fn prefixes(service: &str, shards: u32) -> Vec<String> {
    if shards <= 1 {
        return vec![super::prefix(service)];
    }
    let range = SLOTS / shards;
    (0..shards)
        .map(|i| {
            let low = i * range + range / 4;
            let high = i * range + range * 3 / 4;
            // A tag in the middle half of its range is found within a few
            // tries per shard (CRC16 spreads short strings evenly).
            let tag = (0u32..)
                .map(|j| format!("{service}~{j}"))
                .find(|t| (low..=high).contains(&slot(t)))
                .unwrap_or_else(|| format!("{service}~{i}"));
            format!("catga:{{{tag}}}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // Redis' own test vector for its CRC16, and slots from
        // `CLUSTER KEYSLOT`.
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12_182);
        assert_eq!(slot("bar"), 5_061);
    }

    #[test]
    fn one_shard_is_the_old_layout() {
        assert_eq!(prefixes("orders", 1), vec!["catga:{orders}".to_owned()]);
        assert_eq!(shard_of("anything", 1), 0);
    }

    #[test]
    fn shards_fall_on_evenly_spread_slots() {
        for n in [2u32, 3, 5, 16, crate::config::MAX_STORE_SHARDS] {
            let p = prefixes("orders", n);
            assert_eq!(p.len(), n as usize);
            for (i, prefix) in p.iter().enumerate() {
                let tag = prefix
                    .strip_prefix("catga:{")
                    .and_then(|t| t.strip_suffix('}'))
                    .expect("a tagged prefix");
                let s = slot(tag);
                assert_eq!(s / (SLOTS / n), i as u32, "shard {i} of {n}: slot {s}");
            }
        }
    }

    #[test]
    fn keys_spread_and_braces_group() {
        let mut counts = [0u32; 3];
        for k in 0..3000 {
            counts[shard_of(&format!("acct-{k}"), 3) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (900..=1100).contains(c)), "{counts:?}");
        assert_eq!(shard_of("order-{acct-7}-line-3", 16), shard_of("acct-7", 16));
        assert_eq!(
            placing_part("a{}b"),
            "a{}b",
            "empty braces place by the whole key"
        );
        assert_eq!(placing_part("{x"), "{x");
    }
}
