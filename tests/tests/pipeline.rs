//! The whole userspace pipeline, host only, real TLS over 127.0.0.1.

use std::time::Duration;

use proptest::prelude::*;
use replica_tests::*;

const VOL: &str = "vol1";

struct Pair {
    env: Env,
    target: Daemon,
    source: Daemon,
    src: Source,
    tstate: std::path::PathBuf,
}

fn pair(size: usize, seed: u64, segment_max: usize) -> Pair {
    let env = Env::new();
    let tstate = env.path("tstate");
    let sstate = env.path("sstate");
    let tcfg = env.target_config("target.toml", &tstate, &[(VOL, size as u64)], 100_000, "");
    let (target, addr) = Daemon::start_target(&tcfg, &tstate, &env.path("target.log"));
    let ring = env.path("ring");
    let src = Source::create(&ring, size, 256, 256, seed);
    let scfg = env.source_config(
        "source.toml",
        VOL,
        size as u64,
        &ring,
        &addr,
        &sstate,
        ("pki", SOURCE_CN),
        &env.path("keys.toml"),
        &format!(
            "[segment]\nmax_bytes = {segment_max}\n[retry]\nschedule_secs = [0.05, 0.1, 0.2]\n"
        ),
    );
    let source = Daemon::start("source", &scfg, &sstate, &env.path("source.log"));
    Pair {
        env,
        target,
        source,
        src,
        tstate,
    }
}

impl Pair {
    fn wait_applied(&self, seq: u64) {
        wait_for(
            Duration::from_secs(60),
            &format!("target to apply up to {seq}"),
            || {
                let st = target_state(&self.tstate, VOL);
                assert!(
                    st.critical.is_none(),
                    "target went Critical: {:?}\n{}",
                    st.critical,
                    self.target.log_text()
                );
                applied_published(&self.tstate, VOL) >= seq
            },
        );
    }

    fn check_replica(&self) {
        let got = std::fs::read(self.tstate.join(format!("{VOL}.img"))).expect("replica");
        if let Some(off) = first_difference(&got, &self.src.image, &self.src.masked) {
            panic!(
                "replica differs from the source at byte {off}\nsource log:\n{}\ntarget log:\n{}",
                self.source.log_text(),
                self.target.log_text()
            );
        }
    }

    fn check_points(&self) -> usize {
        let st = target_state(&self.tstate, VOL);
        let mut checked = 0;
        for p in &st.points {
            let (want, mask) = self
                .src
                .points
                .get(&p.seq)
                .unwrap_or_else(|| panic!("point at {} is not a flush or marker", p.seq));
            let got = std::fs::read(point_image(&self.tstate, VOL, p.id)).expect("point image");
            if let Some(off) = first_difference(&got, want, mask) {
                panic!(
                    "recovery point {} differs from the source as of that flush at byte {off}",
                    p.seq
                );
            }
            checked += 1;
        }
        checked
    }
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
        p.wait_applied(last);
        p.check_replica();
        let checked = p.check_points();
        prop_assert!(checked >= 1);
        prop_assert_eq!(checked, p.src.points.len(), "every flush and marker is a recovery point");
        let s = p.source.status(VOL).expect("source status");
        prop_assert!(s.durable_seq >= last);
        let _ = &p.env;
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
    p.wait_applied(p.src.last_seq);
    p.check_replica();
    wait_for(
        Duration::from_secs(10),
        "source to report the failed write",
        || {
            p.source.status(VOL).is_some_and(|s| {
                s.failed_records == 1 && s.reasons.iter().any(|r| r.contains("sector 8"))
            })
        },
    );
    p.source.stop();
    p.target.stop();
}
