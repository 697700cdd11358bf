//! A target and a source replicating one volume, as processes, fed by a
//! userspace ring.

use std::path::PathBuf;
use std::time::Duration;

use crate::{
    applied_published, first_difference, pin_listen, point_image, target_state, wait_for, Daemon,
    Env, Source, SOURCE_CN,
};

/// A target and a source replicating one volume, both as processes, with
/// the source fed by a userspace ring producer.
pub struct Pair {
    /// Target daemon.
    pub target: Daemon,
    /// Its listen address.
    pub addr: String,
    /// Its configuration file.
    pub target_config: PathBuf,
    /// Source daemon.
    pub source: Daemon,
    /// The ring producer and reference model.
    pub src: Source,
}

impl Env {
    /// Starts a target serving `volume` (`size` bytes, `keep_points`), a
    /// ring (`desc` descriptors, `granules` data granules) and a source
    /// shipping it; `source_extra` is appended to the source configuration.
    #[allow(clippy::too_many_arguments)]
    pub fn pair(
        &self,
        volume: &str,
        size: usize,
        keep_points: usize,
        desc: u64,
        granules: u64,
        seed: u64,
        source_extra: &str,
    ) -> Pair {
        let st = self.path("tstate");
        let target_config = self.target_config(
            "target.toml",
            &st,
            &[(volume, size as u64)],
            keep_points,
            "",
        );
        let (target, addr) = Daemon::start_target(&target_config, &st, &self.path("target.log"));
        let ring = self.path("ring");
        let src = Source::create(&ring, size, desc, granules, seed);
        let sst = self.path("sstate");
        let scfg = self.source_config(
            "source.toml",
            volume,
            size as u64,
            &ring,
            &addr,
            &sst,
            ("pki", SOURCE_CN),
            &self.path("keys.toml"),
            source_extra,
        );
        let source = Daemon::start("source", &scfg, &sst, &self.path("source.log"));
        Pair {
            target,
            addr,
            target_config,
            source,
            src,
        }
    }
}

/// A target and a source replicating one volume fed by a userspace ring,
/// with either daemon stopped, killed and restarted at will.
pub struct Rig {
    /// Test directory, certificates, keys.
    pub env: Env,
    /// Volume id.
    pub vol: String,
    /// Volume size.
    pub size: usize,
    /// Target state directory.
    pub tstate: PathBuf,
    /// Source state directory.
    pub sstate: PathBuf,
    /// Target configuration.
    pub tcfg: PathBuf,
    /// Target address (a restarted target listens there again).
    pub addr: String,
    /// Target daemon (killed: no child).
    pub target: Daemon,
    /// Source daemon, once started.
    pub source: Option<Daemon>,
    /// Ring producer and model.
    pub src: Source,
}

impl Rig {
    /// Starts a target (state in `tstate` or the test directory) and
    /// creates a ring of `desc` descriptors and `granules` data granules;
    /// the source is started with [`Rig::start_source`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vol: &str,
        size: usize,
        seed: u64,
        tstate: Option<PathBuf>,
        keep_points: usize,
        target_extra: &str,
        desc: u64,
        granules: u64,
    ) -> Self {
        let env = Env::new();
        let tstate = tstate.unwrap_or_else(|| env.path("tstate"));
        let sstate = env.path("sstate");
        let tcfg = env.target_config(
            "target.toml",
            &tstate,
            &[(vol, size as u64)],
            keep_points,
            target_extra,
        );
        let (target, addr) = Daemon::start_target(&tcfg, &tstate, &env.path("target.log"));
        let src = Source::create(&env.path("ring"), size, desc, granules, seed);
        Self {
            env,
            vol: vol.to_owned(),
            size,
            tstate,
            sstate,
            tcfg,
            addr,
            target,
            source: None,
            src,
        }
    }

    /// Starts (or restarts) the source with segments of `segment_max`
    /// bytes, fast retries (unless `extra` has a `[retry]` table) and
    /// `extra` configuration.
    pub fn start_source(&mut self, segment_max: usize, extra: &str) {
        let addr = self.addr.clone();
        self.start_source_to(&addr, segment_max, extra);
    }

    /// [`Rig::start_source`] shipping to `target` (e.g. a [`crate::Proxy`]
    /// in front of the target) instead of the target's address.
    pub fn start_source_to(&mut self, target: &str, segment_max: usize, extra: &str) {
        // What a previous source published is not this one's status.
        let _ = std::fs::remove_file(self.sstate.join("status.json"));
        let retry = if extra.contains("[retry]") {
            ""
        } else {
            "[retry]\nschedule_secs = [0.02, 0.05, 0.1]\n"
        };
        let cfg = self.env.source_config(
            "source.toml",
            &self.vol,
            self.size as u64,
            &self.env.path("ring"),
            target,
            &self.sstate,
            ("pki", SOURCE_CN),
            &self.env.path("keys.toml"),
            &format!("[segment]\nmax_bytes = {segment_max}\n{retry}{extra}"),
        );
        self.source = Some(Daemon::start(
            "source",
            &cfg,
            &self.sstate,
            &self.env.path("source.log"),
        ));
    }

    /// The running source.
    pub fn source(&mut self) -> &mut Daemon {
        self.source.as_mut().expect("source started")
    }

    /// Restarts the target on its old address.
    pub fn restart_target(&mut self) {
        pin_listen(&self.tcfg, &self.addr);
        let (t, addr) =
            Daemon::start_target(&self.tcfg, &self.tstate, &self.env.path("target.log"));
        assert_eq!(addr, self.addr);
        self.target = t;
    }

    /// Both logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- source log\n{}\n--- target log\n{}",
            self.source
                .as_ref()
                .map(|s| s.log_text())
                .unwrap_or_default(),
            self.target.log_text()
        )
    }

    /// The target's persisted state.
    pub fn target_state(&self) -> replica_store::state::VolumeState {
        target_state(&self.tstate, &self.vol)
    }

    /// Waits until the target applied `seq` (never Critical on the way).
    pub fn wait_applied(&self, seq: u64, timeout: Duration) {
        wait_for(timeout, &format!("target to apply up to {seq}"), || {
            let st = self.target_state();
            assert!(
                st.critical.is_none(),
                "Critical: {:?}\n{}",
                st.critical,
                self.logs()
            );
            applied_published(&self.tstate, &self.vol) >= seq
        });
    }

    /// Checks every recovery point the target keeps against the model.
    pub fn check_points(&self) -> usize {
        let st = self.target_state();
        for p in &st.points {
            let (want, mask) = self
                .src
                .points
                .get(&p.seq)
                .unwrap_or_else(|| panic!("point at {} is not a flush or marker", p.seq));
            let got = std::fs::read(point_image(&self.tstate, &self.vol, p.id)).expect("point");
            assert!(
                first_difference(&got, want, mask).is_none(),
                "point {} differs\n{}",
                p.seq,
                self.logs()
            );
        }
        st.points.len()
    }

    /// Waits until everything produced is applied, then checks the replica
    /// and every recovery point against the model.
    pub fn drain_and_check(&self) {
        self.wait_applied(self.src.last_seq, Duration::from_secs(90));
        let got = std::fs::read(self.tstate.join(format!("{}.img", self.vol))).expect("replica");
        if let Some(off) = first_difference(&got, &self.src.image, &self.src.masked) {
            panic!("replica differs at byte {off}\n{}", self.logs());
        }
        self.check_points();
    }

    /// `n` random operations, waiting for ring space.
    pub fn write(&mut self, n: usize) {
        for _ in 0..n {
            let op = self.src.random_op(128);
            self.src.apply(&op);
        }
    }

    /// Up to `n` random operations while nothing may drain the ring: stops
    /// when it is full (the kernel would switch to its dirty bitmap there).
    pub fn write_while_down(&mut self, n: usize) {
        for _ in 0..n {
            let op = self.src.random_op(128);
            if !self.src.try_apply(&op) {
                break;
            }
        }
    }
}
