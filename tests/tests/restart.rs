//! Restarts and crashes: a source restarted mid-stream, kill -9 of either
//! daemon at random moments, a target whose disk fills up.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use replica_tests::*;

const VOL: &str = "vol1";
const SIZE: usize = 2 << 20;

struct Rig {
    env: Env,
    tstate: PathBuf,
    sstate: PathBuf,
    tcfg: PathBuf,
    addr: String,
    target: Daemon,
    source: Option<Daemon>,
    src: Source,
}

fn rig(seed: u64, tstate: Option<PathBuf>, keep_points: usize, target_extra: &str) -> Rig {
    let env = Env::new();
    let tstate = tstate.unwrap_or_else(|| env.path("tstate"));
    let sstate = env.path("sstate");
    let tcfg = env.target_config(
        "target.toml",
        &tstate,
        &[(VOL, SIZE as u64)],
        keep_points,
        target_extra,
    );
    let (target, addr) = Daemon::start_target(&tcfg, &tstate, &env.path("target.log"));
    // 16 MiB of ring: enough for what is written while a daemon is down.
    let src = Source::create(&env.path("ring"), SIZE, 4096, 4096, seed);
    let mut r = Rig {
        env,
        tstate,
        sstate,
        tcfg,
        addr,
        target,
        source: None,
        src,
    };
    r.start_source(64 << 10);
    r
}

impl Rig {
    fn start_source(&mut self, segment_max: usize) {
        let cfg = self.env.source_config(
            "source.toml",
            VOL,
            SIZE as u64,
            &self.env.path("ring"),
            &self.addr,
            &self.sstate,
            ("pki", SOURCE_CN),
            &self.env.path("keys.toml"),
            &format!("[segment]\nmax_bytes = {segment_max}\n[retry]\nschedule_secs = [0.02, 0.05, 0.1]\n"),
        );
        self.source = Some(Daemon::start(
            "source",
            &cfg,
            &self.sstate,
            &self.env.path("source.log"),
        ));
    }

    fn restart_target(&mut self) {
        // Same address: the source's config names it.
        pin_listen(&self.tcfg, &self.addr);
        let (t, addr) =
            Daemon::start_target(&self.tcfg, &self.tstate, &self.env.path("target.log"));
        assert_eq!(addr, self.addr);
        self.target = t;
    }

    fn logs(&self) -> String {
        format!(
            "--- source log\n{}\n--- target log\n{}",
            self.source
                .as_ref()
                .map(|s| s.log_text())
                .unwrap_or_default(),
            self.target.log_text()
        )
    }

    fn drain_and_check(&self) {
        let last = self.src.last_seq;
        wait_for(
            Duration::from_secs(90),
            &format!("target to apply up to {last}"),
            || {
                let st = target_state(&self.tstate, VOL);
                assert!(
                    st.critical.is_none(),
                    "Critical: {:?}\n{}",
                    st.critical,
                    self.logs()
                );
                st.applied_seq >= last
            },
        );
        let got = std::fs::read(self.tstate.join(format!("{VOL}.img"))).expect("replica");
        if let Some(off) = first_difference(&got, &self.src.image, &self.src.masked) {
            panic!("replica differs at byte {off}\n{}", self.logs());
        }
        let st = target_state(&self.tstate, VOL);
        for p in &st.points {
            let (want, mask) = &self.src.points[&p.seq];
            let got = std::fs::read(point_image(&self.tstate, VOL, p.id)).expect("point");
            assert!(
                first_difference(&got, want, mask).is_none(),
                "point {} differs",
                p.seq
            );
        }
    }

    fn write(&mut self, n: usize) {
        for _ in 0..n {
            let op = self.src.random_op(128);
            self.src.apply(&op);
        }
    }

    /// Writes while a daemon is down: nothing drains the ring, so stop when
    /// it is full (the kernel would switch to its dirty bitmap there).
    fn write_while_down(&mut self, n: usize) {
        for _ in 0..n {
            let op = self.src.random_op(128);
            if !self.src.try_apply(&op) {
                break;
            }
        }
    }
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
    r.write(300);
    // Kill mid-stream, restart with a different segment size: unacked
    // records are batched differently the second time.
    r.source.as_mut().expect("source").kill9();
    r.write_while_down(200);
    r.start_source(1 << 20);
    r.write(300);
    r.source.as_mut().expect("source").stop();
    r.start_source(256 << 10);
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
                r.start_source(64 << 10 << rng.below(5));
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
    let mnt = tempfile::tempdir().expect("mountpoint");
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "this test needs root to mount a size-limited tmpfs"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(mnt.path().to_owned());
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
