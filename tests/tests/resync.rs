//! The target's side of a resync: a stream that resumes after a gap must
//! start with a resync BEGIN; from BEGIN to END the replica is inconsistent
//! and no recovery point is taken; END is a recovery point again.

use std::time::Duration;

use replica_proto::frame::{resync::Marker, ring_op, FEATURE_RESYNC_GAP, RECORD_FLAG_RESYNC};
use replica_proto::keys::KeyRing;
use replica_tests::*;

const SIZE: u64 = 1 << 20;

fn setup() -> (Env, Daemon, String, std::path::PathBuf, KeyRing) {
    let env = Env::new();
    let t = env.one_volume_target("v", SIZE);
    (env, t.daemon, t.addr, t.state_dir, t.keys)
}

/// Connects and sends records 1..=4 (flushes at 1 and 3: recovery points),
/// waiting until they are applied.
fn first_records(env: &Env, addr: &str, st: &std::path::Path, kr: &KeyRing) -> RawClient {
    let mut c =
        RawClient::connect(env, addr, ("pki", SOURCE_CN), "v", [6; 16], 1).expect("connect");
    let f = c.seal(kr, 1, 1, 4, &[0x11; 4096]);
    c.send_frame(f).expect("first frame");
    wait_applied(st, 4);
    c
}

fn points(st: &std::path::Path) -> Vec<u64> {
    target_state(st, "v").points.iter().map(|p| p.seq).collect()
}

fn wait_applied(st: &std::path::Path, seq: u64) {
    wait_for(Duration::from_secs(20), &format!("applied {seq}"), || {
        let s = target_state(st, "v");
        assert!(s.critical.is_none(), "{:?}", s.critical);
        s.applied_seq >= seq
    });
}

#[test]
fn resync_after_a_gap_applies_keeps_the_last_point_and_ends_consistent() {
    let (_env, t, addr, st, kr) = setup();
    let mut c =
        RawClient::connect(&_env, &addr, ("pki", SOURCE_CN), "v", [6; 16], 1).expect("connect");
    // Records 1..=4: flushes at 1 and 3 are recovery points.
    let f = c.seal(&kr, 1, 1, 4, &[0x11; 4096]);
    c.send_frame(f).expect("first frame");
    wait_applied(&st, 4);
    assert_eq!(points(&st), vec![1, 3]);

    // Records 5..=9 were never shipped (the source tracked their regions);
    // the resync starts at 10 and resends region 0 at 11.
    let region = vec![0x22u8; 65536];
    let begin = Marker::Begin { full: false }.aux();
    let f = c.seal_records(
        &kr,
        FEATURE_RESYNC_GAP,
        &[
            (10, ring_op::MARKER, RECORD_FLAG_RESYNC, 0, begin, &[]),
            (11, ring_op::WRITE, RECORD_FLAG_RESYNC, 0, 0, &region),
            (12, ring_op::FLUSH, 0, 0, 0, &[]),
        ],
    );
    let ack = c.send_frame(f).expect("the gap is accepted with a resync");
    assert_eq!(ack.durable_seq, 12);
    wait_applied(&st, 12);
    let s = target_state(&st, "v");
    assert_eq!(s.resync_since, Some(10));
    assert_eq!(points(&st), vec![1, 3], "no point while resyncing");
    let status = t.status("v").expect("status");
    assert_eq!(status.replica, replicad::status::ReplicaState::Inconsistent);
    assert!(status
        .reasons
        .iter()
        .any(|r| r.message.contains("resync in progress")));

    // A write after the resync data, then END: a recovery point again.
    let later = vec![0x33u8; 4096];
    let end = Marker::End.aux();
    let f = c.seal_records(
        &kr,
        0,
        &[
            (13, ring_op::WRITE, 0, 8, 0, &later),
            (14, ring_op::MARKER, RECORD_FLAG_RESYNC, 0, end, &[]),
        ],
    );
    c.send_frame(f).expect("end");
    wait_for(Duration::from_secs(20), "the point at END", || {
        points(&st) == vec![1, 3, 14]
    });
    let s = target_state(&st, "v");
    assert_eq!(s.resync_since, None);
    assert_eq!(s.applied_seq, 14);
    let img = std::fs::read(st.join("v.img")).expect("replica");
    assert!(img[..4096].iter().all(|&b| b == 0x22));
    assert!(
        img[4096..8192].iter().all(|&b| b == 0x33),
        "the later write wins"
    );
    assert!(img[8192..65536].iter().all(|&b| b == 0x22));
    wait_for(Duration::from_secs(10), "status consistent", || {
        t.status("v")
            .is_some_and(|s| s.replica == replicad::status::ReplicaState::Consistent)
    });
}

#[test]
fn gap_without_the_resync_feature_is_refused() {
    let (env, _t, addr, st, kr) = setup();
    let mut c = first_records(&env, &addr, &st, &kr);
    let f = c.seal(&kr, 1, 10, 2, &[0x11; 4096]);
    let e = c.send_bad_frame(f).expect("a plain gap must be refused");
    assert!(e.starts_with("sequence-gap"), "{e}");
    assert_eq!(target_state(&st, "v").applied_seq, 4);
}

#[test]
fn gap_that_does_not_start_with_begin_applies_nothing_and_is_critical() {
    let (env, _t, addr, st, kr) = setup();
    let mut c = first_records(&env, &addr, &st, &kr);
    let before = std::fs::read(st.join("v.img")).expect("replica");
    let junk = vec![0x44u8; 4096];
    let f = c.seal_records(
        &kr,
        FEATURE_RESYNC_GAP,
        &[(10, ring_op::WRITE, 0, 0, 0, &junk)],
    );
    // Journaled (authenticated), then refused by the applier.
    let _ = c.send_frame(f);
    wait_for(Duration::from_secs(20), "Critical", || {
        target_state(&st, "v").critical.is_some()
    });
    let s = target_state(&st, "v");
    assert!(
        s.critical
            .as_deref()
            .is_some_and(|c| c.contains("does not start a resync")),
        "{:?}",
        s.critical
    );
    assert_eq!(s.applied_seq, 4);
    assert_eq!(std::fs::read(st.join("v.img")).expect("replica"), before);
}

fn begin(seq: u64, full: bool) -> (u64, u8, u8, u64, u64, &'static [u8]) {
    (
        seq,
        ring_op::MARKER,
        RECORD_FLAG_RESYNC,
        0,
        Marker::Begin { full }.aux(),
        &[],
    )
}

fn end(seq: u64) -> (u64, u8, u8, u64, u64, &'static [u8]) {
    (
        seq,
        ring_op::MARKER,
        RECORD_FLAG_RESYNC,
        0,
        Marker::End.aux(),
        &[],
    )
}

/// The source host restarted under a running target: a new ring whose
/// sequences start over at 1, far below what the old generation applied.
/// The takeover goes through the applier after every old segment, so the
/// new generation's records are applied (not skipped as "already applied")
/// and the applied sequence is never written back to the old value.
#[test]
fn a_new_ring_generation_is_taken_over_by_the_applier_and_needs_a_full_resync() {
    let (env, t, addr, st, kr) = setup();
    let mut c =
        RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [6; 16], 1).expect("connect");
    // Old generation: records 1..=40 (writes of 0x11 at sector 0, flushes),
    // the last ones still queued for the applier when the new one arrives.
    let f = c.seal(&kr, 1, 1, 40, &[0x11; 4096]);
    c.send_frame(f).expect("old generation");
    drop(c);
    let mut c = RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [7; 16], 1)
        .expect("a new generation is taken over");
    assert!(
        c.welcome.resync_required,
        "the target demands a full resync of the new generation"
    );
    assert_eq!(
        c.welcome.durable_seq, 0,
        "the new sequence space starts over"
    );
    let s = target_state(&st, "v");
    assert_eq!(s.generation, hex::encode([7u8; 16]));
    assert!(s.needs_full_resync);
    assert_eq!(s.applied_seq, 0);
    let old_points = points(&st);
    assert_eq!(
        old_points.last(),
        Some(&39),
        "every old segment was applied first (its last flush is a point)"
    );
    wait_for(Duration::from_secs(10), "status inconsistent", || {
        t.status("v")
            .is_some_and(|s| s.replica == replicad::status::ReplicaState::Inconsistent)
    });
    // The old generation's records say nothing about the new one's.
    let (g6, g7) = (hex::encode([6u8; 16]), hex::encode([7u8; 16]));
    let e = replctl::wait::wait_applied(&st, "v", 3, &g6, Duration::from_millis(500))
        .expect_err("the old generation is not the one applied now");
    assert!(matches!(e, replctl::wait::WaitError::Timeout { .. }), "{e}");
    let e = replctl::wait::wait_applied(&st, "v", 3, &g7, Duration::from_millis(500))
        .expect_err("record 3 of the new generation is not applied yet");
    assert!(matches!(e, replctl::wait::WaitError::Timeout { .. }), "{e}");

    // A partial resync does not make a replica without a copy consistent.
    let f = c.seal_records(
        &kr,
        0,
        &[begin(1, false), (2, ring_op::FLUSH, 0, 0, 0, &[]), end(3)],
    );
    c.send_frame(f).expect("partial resync");
    wait_applied(&st, 3);
    let s = target_state(&st, "v");
    assert!(s.needs_full_resync, "a partial resync is not a copy");
    assert!(s.resync_since.is_some());
    assert_eq!(points(&st), old_points, "no point from a partial resync");

    // The full one: region 0 resent, a later write to it wins, END.
    let region = vec![0x55u8; 65536];
    let later = vec![0x66u8; 4096];
    let f = c.seal_records(
        &kr,
        0,
        &[
            begin(4, true),
            (5, ring_op::WRITE, RECORD_FLAG_RESYNC, 0, 0, &region),
            (6, ring_op::FLUSH, 0, 0, 0, &[]),
            (7, ring_op::WRITE, 0, 8, 0, &later),
            end(8),
        ],
    );
    c.send_frame(f).expect("full resync");
    wait_for(Duration::from_secs(20), "the point at END", || {
        points(&st).last() == Some(&8)
    });
    let s = target_state(&st, "v");
    assert!(!s.needs_full_resync);
    assert_eq!(s.resync_since, None);
    assert_eq!(s.applied_seq, 8);
    let img = std::fs::read(st.join("v.img")).expect("replica");
    assert!(
        img[..4096].iter().all(|&b| b == 0x55),
        "resync data applied"
    );
    assert!(
        img[4096..8192].iter().all(|&b| b == 0x66),
        "the later write wins"
    );
    assert!(img[8192..65536].iter().all(|&b| b == 0x55));
    wait_for(Duration::from_secs(10), "status consistent", || {
        t.status("v")
            .is_some_and(|s| s.replica == replicad::status::ReplicaState::Consistent)
    });
    replctl::wait::wait_applied(&st, "v", 8, &g7, Duration::from_secs(10))
        .expect("record 8 of the new generation is applied");
    // And it stays that way: no stale applied sequence written back.
    drop(c);
    let c = RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [7; 16], 9).expect("again");
    assert!(!c.welcome.resync_required);
    assert_eq!(c.welcome.durable_seq, 8);
    assert_eq!(target_state(&st, "v").applied_seq, 8);
}

/// A target with no record of a volume (new, or its state removed) takes a
/// stream as a copy only when the source declares the replica seeded and
/// the stream starts at record 1; otherwise it demands a full resync and
/// takes no recovery point until that resync's END.
#[test]
fn a_target_without_a_copy_demands_a_full_resync() {
    for (seeded, oldest, required) in [(false, 1, true), (true, 5, true), (true, 1, false)] {
        let (env, t, addr, st, kr) = setup();
        let mut c = RawClient::connect_with(
            &env,
            &addr,
            ("pki", SOURCE_CN),
            "v",
            [6; 16],
            oldest,
            HelloOpts {
                resync: false,
                replica_seeded: seeded,
                ..HelloOpts::default()
            },
        )
        .expect("connect");
        assert_eq!(
            c.welcome.resync_required, required,
            "seeded {seeded}, oldest {oldest}"
        );
        let f = c.seal(&kr, 1, oldest, 4, &[0x11; 4096]);
        c.send_frame(f).expect("records");
        wait_applied(&st, oldest + 3);
        let s = target_state(&st, "v");
        assert_eq!(s.needs_full_resync, required);
        if required {
            assert!(
                points(&st).is_empty(),
                "no point over a replica without a copy"
            );
            assert_eq!(
                t.status("v").expect("status").replica,
                replicad::status::ReplicaState::Inconsistent
            );
            let g = hex::encode([6u8; 16]);
            if oldest > 1 {
                // Records before the stream's first were never received: a
                // wait for one is told so rather than "applied".
                let e =
                    replctl::wait::wait_applied(&st, "v", oldest - 1, &g, Duration::from_secs(5))
                        .expect_err("never received");
                assert!(
                    matches!(e, replctl::wait::WaitError::NeverReceived { base, .. } if base == oldest - 1),
                    "{e}"
                );
            }
            // A new connection is told again.
            drop(c);
            let mut c =
                RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [6; 16], oldest + 4)
                    .expect("again");
            assert!(c.welcome.resync_required);
            assert!(c.welcome.inconsistent);
            // The END of a full resync makes it consistent.
            let n = oldest + 4;
            let f = c.seal_records(
                &kr,
                0,
                &[
                    begin(n, true),
                    (n + 1, ring_op::FLUSH, 0, 0, 0, &[]),
                    end(n + 2),
                ],
            );
            c.send_frame(f).expect("full resync");
            wait_for(Duration::from_secs(20), "the point at END", || {
                points(&st) == vec![n + 2]
            });
            let s = target_state(&st, "v");
            assert!(!s.needs_full_resync);
            assert_eq!(s.resync_since, None);
            drop(c);
            let c = RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [6; 16], n + 3)
                .expect("after the copy");
            assert!(!c.welcome.resync_required && !c.welcome.inconsistent);
        } else {
            assert!(!points(&st).is_empty());
        }
    }
}

/// A source whose target has no copy of the volume is told so and switches
/// to a full resync by itself (here in development mode, where a resync
/// cannot run: it says so instead of replicating as if the replica were a
/// copy); the target takes no recovery point meanwhile.
#[test]
fn a_source_told_its_target_has_no_copy_needs_a_full_resync() {
    let mut r = Rig::new("v", 1 << 20, 3, None, 100_000, "", 256, 256);
    r.start_source(1 << 20, "initial_copy = true");
    r.write(50);
    wait_for(
        Duration::from_secs(30),
        "the source needs a full resync",
        || {
            r.source().status("v").is_some_and(|s| {
                s.needs_resync
                    && s.dirty_regions == 16
                    && s.reasons
                        .iter()
                        .any(|x| x.message.contains("the target holds no consistent copy"))
            })
        },
    );
    let st = r.target_state();
    assert!(st.needs_full_resync);
    assert!(st.points.is_empty(), "{:?}", st.points);
    assert_eq!(
        r.target.status("v").expect("status").replica,
        replicad::status::ReplicaState::Inconsistent
    );
}

/// After a takeover, sequences start over: a point of the new generation at
/// a sequence an old generation's point has gets an id of its own, and the
/// old point (a valid state of the volume) stays as it was.
#[test]
fn a_new_generations_point_never_replaces_an_old_one() {
    let (env, _t, addr, st, kr) = setup();
    // Old generation: points at 1 and 3, the replica holds 0x11.
    drop(first_records(&env, &addr, &st, &kr));
    let old3 = std::fs::read(point_image(&st, "v", 3)).expect("old point 3");
    let mut c =
        RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [7; 16], 1).expect("takeover");
    let region = vec![0x77u8; 65536];
    let f = c.seal_records(
        &kr,
        0,
        &[
            begin(1, true),
            (2, ring_op::WRITE, RECORD_FLAG_RESYNC, 0, 0, &region),
            end(3),
        ],
    );
    c.send_frame(f).expect("full resync");
    wait_for(Duration::from_secs(20), "the new point at record 3", || {
        target_state(&st, "v")
            .points
            .iter()
            .any(|p| p.seq == 3 && p.generation == hex::encode([7u8; 16]))
    });
    let s = target_state(&st, "v");
    let ids: Vec<(u64, u64)> = s.points.iter().map(|p| (p.id, p.seq)).collect();
    assert_eq!(ids, vec![(1, 1), (3, 3), (4, 3)], "{:?}", s.points);
    assert_eq!(
        std::fs::read(point_image(&st, "v", 3)).expect("old point 3"),
        old3,
        "the old generation's point is untouched"
    );
    let new = std::fs::read(point_image(&st, "v", 4)).expect("new point");
    assert!(new[..65536].iter().all(|&b| b == 0x77));
}
