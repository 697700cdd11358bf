//! The whole userspace pipeline, host only, real TLS over 127.0.0.1.

use std::time::Duration;

use proptest::prelude::*;
use replica_tests::*;

const VOL: &str = "vol1";

/// A target and a source over a ring of 256 descriptors and 1 MiB of data,
/// keeping every recovery point.
fn pair(size: usize, seed: u64, segment_max: usize) -> Rig {
    let mut r = Rig::new(VOL, size, seed, None, 100_000, "", 256, 256);
    r.start_source(segment_max, "");
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random writes (varied sizes, overlapping), flushes, discards, write
    /// zeroes and markers: after the pipeline drains, the replica equals the
    /// source (discarded ranges masked), and every recovery point equals the
    /// source as of its flush.
    #[test]
    fn replica_and_every_point_match_the_source(seed in any::<u64>(), n in 50usize..400, seg in prop_oneof![Just(65536usize), Just(1 << 20)]) {
        let mut p = pair(1 << 20, seed, seg);
        for _ in 0..n {
            let op = p.src.random_op(64);
            p.src.apply(&op);
        }
        p.src.apply(&Op::Flush);
        let last = p.src.last_seq;
        // Replica and every recovery point equal the source.
        p.drain_and_check();
        let checked = p.target_state().points.len();
        prop_assert!(checked >= 1);
        prop_assert_eq!(checked, p.src.points.len(), "every flush and marker is a recovery point");
        let s = p.source().status(VOL).expect("source status");
        prop_assert!(s.durable_seq >= last);
    }
}

#[test]
fn failed_writes_are_never_shipped_and_are_reported() {
    let mut p = pair(1 << 20, 7, 1 << 20);
    p.src.apply(&Op::Write {
        sector: 0,
        len: 8192,
        ok: true,
    });
    p.src.apply(&Op::Write {
        sector: 8,
        len: 4096,
        ok: false,
    });
    p.src.apply(&Op::Write {
        sector: 64,
        len: 4096,
        ok: true,
    });
    p.src.apply(&Op::Flush);
    p.drain_and_check();
    wait_for(
        Duration::from_secs(10),
        "source to report the failed write",
        || {
            p.source().status(VOL).is_some_and(|s| {
                s.failed_records == 1 && s.reasons.iter().any(|r| r.contains("sector 8"))
            })
        },
    );
    p.source().stop();
    p.target.stop();
}
