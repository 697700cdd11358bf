//! Restarts and crashes: a source restarted mid-stream, kill -9 of either
//! daemon at random moments, a target whose disk fills up.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use replica_tests::*;

const VOL: &str = "vol1";
const SIZE: usize = 2 << 20;

fn rig(seed: u64, tstate: Option<PathBuf>, keep_points: usize, target_extra: &str) -> Rig {
    // 16 MiB of ring: enough for what is written while a daemon is down.
    let mut r = Rig::new(
        VOL,
        SIZE,
        seed,
        tstate,
        keep_points,
        target_extra,
        4096,
        4096,
    );
    r.start_source(64 << 10, "");
    r
}

/// Every journaled frame's (stream id, key id, counter): the AES-GCM
/// (key, nonce) pairs the target has seen.
fn journal_nonces(tstate: &Path) -> Vec<([u8; 16], u32, u64)> {
    journal_headers(tstate, VOL)
        .into_iter()
        .map(|h| (h.stream_id, h.key_id, h.counter))
        .collect()
}

#[test]
fn source_restart_rebatches_without_loss_duplicates_or_nonce_reuse() {
    let mut r = rig(11, None, 100_000, "");
    let streams_seen = |r: &Rig| {
        journal_nonces(&r.tstate)
            .iter()
            .map(|n| n.0)
            .collect::<HashSet<_>>()
            .len()
    };
    r.write(300);
    // Kill mid-stream (once this start has streamed), restart with a
    // different segment size: unacked records are batched differently the
    // second time.
    wait_for(Duration::from_secs(30), "the first start streams", || {
        streams_seen(&r) >= 1
    });
    r.source.as_mut().expect("source").kill9();
    r.write_while_down(200);
    r.start_source(1 << 20, "");
    r.write(300);
    wait_for(Duration::from_secs(30), "the second start streams", || {
        streams_seen(&r) >= 2
    });
    r.source.as_mut().expect("source").stop();
    r.start_source(256 << 10, "");
    r.write(100);
    r.src.apply(&Op::Flush);
    r.drain_and_check();
    // Every record applied exactly once (the target did not restart, so its
    // counter covers the whole run).
    let st = r.target.status(VOL).expect("target status");
    assert_eq!(
        st.applied_records,
        r.src.last_seq,
        "records applied != records produced\n{}",
        r.logs()
    );
    let nonces = journal_nonces(&r.tstate);
    let uniq: HashSet<_> = nonces.iter().collect();
    assert_eq!(
        uniq.len(),
        nonces.len(),
        "a (stream key, nonce) pair was used twice"
    );
    let streams: HashSet<_> = nonces.iter().map(|n| n.0).collect();
    assert!(
        streams.len() >= 3,
        "each source start must use a fresh stream id: {}",
        streams.len()
    );
}

#[test]
fn kill9_of_either_daemon_at_random_moments_loses_nothing() {
    for seed in [1u64, 2, 3] {
        let mut r = rig(seed, None, 100_000, "journal_file_bytes = 262144");
        let mut rng = Rng::new(seed ^ 0xdead);
        for _round in 0..6 {
            r.write(20 + rng.below(200) as usize);
            if rng.below(2) == 0 {
                r.source.as_mut().expect("source").kill9();
                r.write_while_down(rng.below(100) as usize);
                r.start_source(64 << 10 << rng.below(5), "");
            } else {
                r.target.kill9();
                r.write_while_down(rng.below(100) as usize);
                r.restart_target();
            }
        }
        r.src.apply(&Op::Flush);
        r.drain_and_check();
    }
}

#[test]
fn target_disk_full_is_retried_and_recovers_without_corruption() {
    // A size-limited tmpfs for the target's journal, points and replica.
    let mnt = Tmpfs::mount("12m");
    let tstate = mnt.path().join("tstate");
    // Keep only two points so the disk holds replica, points and journal.
    let mut r = rig(5, Some(tstate.clone()), 2, "journal_file_bytes = 262144");
    r.write(100);
    r.src.apply(&Op::Flush);
    wait_for(Duration::from_secs(30), "first segments applied", || {
        target_state(&tstate, VOL).applied_seq > 0
    });
    // Fill the disk.
    let filler = mnt.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    r.write_while_down(300);
    // The target's own status file sits on the full disk too: its log
    // (journald in production) is where it says so.
    wait_for(
        Duration::from_secs(30),
        "target to report the full disk",
        || r.target.log_text().contains("No space left on device"),
    );
    let st = target_state(&tstate, VOL);
    assert!(
        st.critical.is_none(),
        "a full disk is recoverable: {:?}",
        st.critical
    );
    // Space comes back: replication resumes by itself.
    std::fs::remove_file(&filler).expect("remove filler");
    r.src.apply(&Op::Flush);
    r.drain_and_check();
}
