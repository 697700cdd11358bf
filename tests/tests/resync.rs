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
    let st = env.path("tstate");
    let cfg = env.target_config("target.toml", &st, &[("v", SIZE)], 64, "");
    let (d, addr) = Daemon::start_target(&cfg, &st, &env.path("target.log"));
    let kr = KeyRing::load(&env.path("keys.toml")).expect("keys");
    (env, d, addr, st, kr)
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
    let begin = Marker::Begin.aux();
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
    assert_eq!(status.replica, "Inconsistent");
    assert!(status
        .reasons
        .iter()
        .any(|r| r.contains("resync in progress")));

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
        t.status("v").is_some_and(|s| s.replica == "Consistent")
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

#[test]
fn a_new_ring_generation_is_taken_over_only_with_a_resync() {
    let (env, t, addr, st, kr) = setup();
    drop(first_records(&env, &addr, &st, &kr));
    // The source host restarted: a new ring whose sequences start over.
    let e = RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [7; 16], 1)
        .err()
        .expect("another generation without a resync is refused");
    assert!(e.starts_with("generation"), "{e}");
    // Refused, not Critical: the same source can come back with a resync.
    let _ = std::fs::remove_file(st.join("volumes/v/state.json.tmp"));
    let mut st_now = target_state(&st, "v");
    st_now.critical = None;
    st_now
        .save(&st.join("volumes/v/state.json"))
        .expect("clear");
    drop(t);
    let cfg = env.path("target.toml");
    pin_listen(&cfg, &addr);
    let (_t, _) = Daemon::start_target(&cfg, &st, &env.path("target.log"));
    let mut c = RawClient::connect_with(&env, &addr, ("pki", SOURCE_CN), "v", [7; 16], 1, true)
        .expect("a new generation starting with a resync is taken over");
    assert_eq!(
        c.welcome.durable_seq, 0,
        "the new sequence space starts over"
    );
    let s = target_state(&st, "v");
    assert_eq!(s.generation, hex::encode([7u8; 16]));
    assert_eq!(s.resync_since, Some(1));
    assert_eq!(points(&st), vec![1, 3], "the old generation's points stay");
    let region = vec![0x55u8; 65536];
    let f = c.seal_records(
        &kr,
        FEATURE_RESYNC_GAP,
        &[
            (
                3,
                ring_op::MARKER,
                RECORD_FLAG_RESYNC,
                0,
                Marker::Begin.aux(),
                &[],
            ),
            (4, ring_op::WRITE, RECORD_FLAG_RESYNC, 0, 0, &region),
            (5, ring_op::FLUSH, 0, 0, 0, &[]),
            (
                6,
                ring_op::MARKER,
                RECORD_FLAG_RESYNC,
                0,
                Marker::End.aux(),
                &[],
            ),
        ],
    );
    c.send_frame(f).expect("resync");
    wait_for(Duration::from_secs(20), "the point at END", || {
        points(&st) == vec![1, 3, 6]
    });
    assert_eq!(target_state(&st, "v").resync_since, None);
}
