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
fn a_failed_write_is_never_shipped_and_stops_the_stream_into_a_resync() {
    let mut p = pair(1 << 20, 7, 1 << 20);
    p.src.apply(&Op::Write {
        sector: 0,
        len: 8192,
        ok: true,
    });
    // In a region of its own (regions are 64 KiB): region 2.
    p.src.apply(&Op::Write {
        sector: 264,
        len: 4096,
        ok: false,
    });
    p.src.apply(&Op::Write {
        sector: 64,
        len: 4096,
        ok: true,
    });
    p.src.apply(&Op::Flush);
    // What the disk holds where the write failed is unknown: the source
    // stops the stream before it and needs a resync of the regions.
    wait_for(
        Duration::from_secs(20),
        "source to report the failed write and need a resync",
        || {
            p.source().status(VOL).is_some_and(|s| {
                s.failed_records == 1
                    && s.needs_resync
                    && s.dirty_regions >= 1
                    && s.lag_records == 0
                    && s.reasons.iter().any(|r| r.message.contains("sector 264"))
            })
        },
    );
    // The failed write's own region is in the saved map, for the resync.
    let map = p.env.resync_state(&p.sstate, VOL).expect("saved");
    assert!(map.map.is_set(2), "the failed write's region is dirty");
    // Nothing from the failed write on reached the target (its journal
    // holds every record it was sent), so no recovery point claims a state
    // the source disk may not hold.
    let sent: Vec<_> = journal_headers(&p.tstate, VOL)
        .iter()
        .map(|h| (h.first_seq, h.last_seq))
        .collect();
    assert!(sent.iter().all(|&(_, last)| last < 2), "{sent:?}");
    let st = p.target_state();
    assert!(st.points.iter().all(|pt| pt.seq < 2), "{:?}", st.points);
    p.source().stop();
    p.target.stop();
}
