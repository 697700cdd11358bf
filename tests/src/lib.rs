//! Test harness for host-only end-to-end tests: certificates and keys in a
//! temporary directory, `replicad` processes for both roles, a userspace
//! producer that writes exactly the kernel's ring ABI, and a reference model
//! of the source volume to compare the replica and its recovery points with.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replica_ring::{DescFields, Producer, RingError, RingParams};
use ring_abi::{OP_DISCARD, OP_FLUSH, OP_MARKER, OP_WRITE, OP_WRITE_ZEROES};

/// Path of the daemon binary built for these tests.
pub fn replicad_bin() -> PathBuf {
    test_bin("replicad-test")
}

/// Path of the `replctl` binary built for these tests.
pub fn replctl_bin() -> PathBuf {
    test_bin("replctl-test")
}

/// A binary of this package (cargo builds them next to the integration
/// test executables' `deps`).
fn test_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test -p replica-tests`",
        bin.display()
    );
    bin
}

/// Sends one line to a daemon's control socket as it is, and returns the
/// answer (for requests the typed client cannot make: another version, an
/// unknown command, malformed JSON).
pub fn control_line(sock: &Path, line: &str) -> replica_control::Response {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.write_all(format!("{line}\n").as_bytes()).expect("write");
    let mut answer = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut answer)
        .expect("read");
    serde_json::from_str(&answer).expect("a response")
}

/// Waits until `f` returns true, polling, or panics after `timeout` with
/// `what` and the last diagnostic `f` left in `why`.
pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(2);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// A small deterministic generator (xorshift64*), so every seed replays.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Fills a buffer.
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Certificates, keys and directories for one test. Set
/// `REPLICA_TEST_KEEP=1` to keep the directory (logs, journals) after the
/// test.
pub struct Env {
    root: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// Host names used in test certificates.
pub const SOURCE_CN: &str = "source-a";
/// The target's certificate name.
pub const TARGET_CN: &str = "target.example";

impl Env {
    /// Creates a CA with certificates for the source, the target and an
    /// intruder (CA-issued but not authorised), a foreign CA with its own
    /// source certificate, and a keyring.
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_owned();
        let keep = std::env::var_os("REPLICA_TEST_KEEP").is_some();
        let dir = if keep {
            eprintln!("test directory kept: {}", tmp.keep().display());
            None
        } else {
            Some(tmp)
        };
        let pki = root.join("pki");
        replctl::certs::generate(
            &pki,
            &[SOURCE_CN.into(), TARGET_CN.into(), "intruder".into()],
            365,
        )
        .expect("certs");
        replctl::certs::generate(&root.join("foreign"), &[SOURCE_CN.into()], 365)
            .expect("foreign certs");
        let kr = replica_proto::keys::KeyRing::generate().expect("keys");
        kr.save(&root.join("keys.toml"), false).expect("save keys");
        Self { root, _dir: dir }
    }

    /// A path inside the test directory.
    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p)
    }

    /// Writes a target configuration serving `volumes` (id, size) with file
    /// replicas under `<root>/<id>.img`, state in `state_dir`.
    pub fn target_config(
        &self,
        name: &str,
        state_dir: &Path,
        volumes: &[(&str, u64)],
        keep_points: usize,
        extra: &str,
    ) -> PathBuf {
        let pki = self.path("pki");
        let mut s = format!(
            "listen = \"127.0.0.1:0\"\nkeys = \"{}\"\nstate_dir = \"{}\"\n{extra}\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.path("keys.toml").display(),
            state_dir.display(),
            pki.join("ca.pem").display(),
            pki.join(format!("{TARGET_CN}.pem")).display(),
            pki.join(format!("{TARGET_CN}.key")).display(),
        );
        for (id, size) in volumes {
            s.push_str(&format!(
                "\n[[volume]]\nid = \"{id}\"\nsize = {size}\nallowed_sources = [\"{SOURCE_CN}\"]\nkeep_points = {keep_points}\ncrash_point_interval_secs = 0\nreplica = {{ backend = \"file\", path = \"{}\" }}\n",
                state_dir.join(format!("{id}.img")).display()
            ));
        }
        let p = self.path(name);
        std::fs::write(&p, s).expect("write target config");
        p
    }

    /// Writes a source configuration.
    #[allow(clippy::too_many_arguments)]
    pub fn source_config(
        &self,
        name: &str,
        volume: &str,
        size: u64,
        ring: &Path,
        target: &str,
        state_dir: &Path,
        cert: (&str, &str),
        keys: &Path,
        extra: &str,
    ) -> PathBuf {
        // Test volumes are tiny and written far beyond their size: unless a
        // test sets its own spool settings, keep a spool of 100 volumes'
        // worth so a burst never trips the resync limit.
        let spool = if extra.contains("[spool]") {
            ""
        } else {
            "[spool]\nlimit_percent = 10000\n"
        };
        // Test volumes and replicas start zeroed: no initial copy unless a
        // test asks for one.
        // (`initial_copy = true` anywhere in `extra` is moved to the top
        // level, where it belongs).
        let wants_copy = extra.contains("initial_copy = true");
        let extra = extra.replace("initial_copy = true", "");
        let initial = format!("initial_copy = {wants_copy}\n");
        let s = format!(
            "{initial}volume = \"{volume}\"\nvolume_size = {size}\nring = {{ file = \"{}\" }}\ntarget = \"{target}\"\ntarget_name = \"{TARGET_CN}\"\nkeys = \"{}\"\nstate_dir = \"{}\"\n{extra}\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{spool}",
            ring.display(),
            keys.display(),
            state_dir.display(),
            self.path("pki/ca.pem").display(),
            self.path(&format!("{}/{}.pem", cert.0, cert.1)).display(),
            self.path(&format!("{}/{}.key", cert.0, cert.1)).display(),
        );
        let p = self.path(name);
        std::fs::write(&p, s).expect("write source config");
        p
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

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

/// Rewrites a target configuration to listen on `addr` again (so a
/// restarted target is where its sources look for it).
pub fn pin_listen(config: &Path, addr: &str) {
    let text = std::fs::read_to_string(config)
        .expect("read config")
        .replace("127.0.0.1:0", addr);
    std::fs::write(config, text).expect("write config");
}

/// A `replicad` process.
pub struct Daemon {
    child: Option<Child>,
    /// Its stderr log.
    pub log: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
}

impl Daemon {
    /// Starts `replicad <role> --config <config>`.
    pub fn start(role: &str, config: &Path, state_dir: &Path, log: &Path) -> Self {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let child = Command::new(replicad_bin())
            .args([role, "--config"])
            .arg(config)
            .env("REPLICAD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn replicad");
        Self {
            child: Some(child),
            log: log.to_owned(),
            state_dir: state_dir.to_owned(),
        }
    }

    /// Starts a target and waits until it listens; returns it and its address.
    pub fn start_target(config: &Path, state_dir: &Path, log: &Path) -> (Self, String) {
        let _ = std::fs::remove_file(state_dir.join("listen.addr"));
        let mut d = Self::start("target", config, state_dir, log);
        let mut addr = String::new();
        wait_for(Duration::from_secs(20), "target to listen", || {
            if let Some(code) = d.try_exit() {
                panic!(
                    "target exited with {code:?} before listening:\n{}",
                    d.log_text()
                );
            }
            match std::fs::read_to_string(state_dir.join("listen.addr")) {
                Ok(a) if !a.is_empty() => {
                    addr = a.trim().to_owned();
                    true
                }
                _ => false,
            }
        });
        (d, addr)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Exit code if it has exited.
    pub fn try_exit(&mut self) -> Option<Option<i32>> {
        let c = self.child.as_mut()?;
        c.try_wait().ok().flatten().map(|s| s.code())
    }

    /// Waits for it to exit on its own (panics with its log on timeout).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.try_exit() {
                self.child = None;
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {timeout:?}; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (e.g. SIGHUP).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).expect("signal");
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Option<i32> {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if self.child.is_some() {
            self.wait_exit(Duration::from_secs(30))
        } else {
            None
        }
    }

    /// The status of `volume` ([`volume_status`]).
    pub fn status(&self, volume: &str) -> Option<replicad::status::VolumeStatus> {
        volume_status(&self.state_dir, volume)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the target has published as applied for `volume`: only once any
/// recovery point at that sequence is recorded (unlike `state.json`, which
/// records the applied sequence before the point it belongs to).
pub fn applied_published(state_dir: &Path, volume: &str) -> u64 {
    // The daemon's live answer (its status file may sit on a full disk).
    volume_status(state_dir, volume).map_or(0, |s| s.applied_seq)
}

/// The status of `volume` of the daemon with state directory `state_dir`:
/// its live answer on its control socket, or (once it stopped) its last
/// published `status.json`, whose counters may be up to a second old
/// while it runs.
pub fn volume_status(state_dir: &Path, volume: &str) -> Option<replicad::status::VolumeStatus> {
    let live = replica_control::request(
        &replica_control::default_path(state_dir),
        replica_control::Command::Status,
    )
    .ok()
    .and_then(|r| r.status);
    live.or_else(|| replicad::status::read(state_dir).ok())?
        .into_iter()
        .find(|v| v.volume == volume)
}

/// The target's persisted state of a volume.
pub fn target_state(state_dir: &Path, volume: &str) -> replica_store::state::VolumeState {
    replica_store::state::VolumeState::load(
        &state_dir.join("volumes").join(volume).join("state.json"),
    )
    .expect("state")
}

/// The header of every segment in a target volume's journal, checked
/// (checksums) and in journal order.
pub fn journal_headers(state_dir: &Path, volume: &str) -> Vec<replica_proto::frame::SegmentHeader> {
    let dir = state_dir.join("volumes").join(volume).join("journal");
    replica_store::journal::frames(&dir)
        .expect("journal")
        .into_iter()
        .map(|f| f.header)
        .collect()
}

/// Path of a recovery point image on the file backend.
pub fn point_image(state_dir: &Path, volume: &str, id: u64) -> PathBuf {
    state_dir
        .join("volumes")
        .join(volume)
        .join("points")
        .join(format!("{id:020}.img"))
}

/// One operation of a workload.
#[derive(Debug, Clone)]
pub enum Op {
    /// Write `len` bytes of fresh data at `sector`; `ok = false` makes the
    /// write fail on the "source disk" (never applied, never shipped).
    Write {
        /// Sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// Succeeds on the source.
        ok: bool,
    },
    /// Flush (a recovery point on the target).
    Flush,
    /// Discard.
    Discard {
        /// Sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Write zeroes.
    Zeroes {
        /// Sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Marker.
    Marker(u64),
}

/// The source volume as the kernel would see it, plus the ring producer.
pub struct Source {
    /// Producer into the ring file.
    pub producer: Producer,
    /// Current content of the source volume.
    pub image: Vec<u8>,
    /// Bytes whose content is unspecified (discarded since last written).
    pub masked: Vec<bool>,
    /// Image (and mask) as of each flush or marker, by record sequence.
    pub points: std::collections::BTreeMap<u64, (Vec<u8>, Vec<bool>)>,
    /// Last record sequence produced.
    pub last_seq: u64,
    /// Failed writes (sector, len).
    pub failed: Vec<(u64, u32)>,
    rng: Rng,
    keep_points: bool,
}

impl Source {
    /// A fresh ring file and a zeroed volume of `size` bytes.
    pub fn create(
        ring: &Path,
        size: usize,
        desc_count: u64,
        data_granules: u64,
        seed: u64,
    ) -> Self {
        let producer = Producer::create(
            ring,
            RingParams {
                desc_count,
                data_granules,
                generation: replica_proto::keys::random16().expect("rand"),
                first_seq: 1,
                first_granule: 0,
            },
        )
        .expect("create ring");
        Self {
            producer,
            image: vec![0; size],
            masked: vec![false; size],
            points: Default::default(),
            last_seq: 0,
            failed: Vec::new(),
            rng: Rng::new(seed),
            keep_points: true,
        }
    }

    /// Do not keep images per flush (large workloads).
    pub fn without_point_images(mut self) -> Self {
        self.keep_points = false;
        self
    }

    /// Reserves a record, waiting (up to a deadline) while the ring is full
    /// unless `nowait`.
    fn reserve(&mut self, f: DescFields, payload: &[u8], nowait: bool) -> Option<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.producer.reserve(f, payload) {
                Ok(s) => return Some(s),
                Err(RingError::Full) if nowait => return None,
                Err(RingError::Full) => {
                    assert!(
                        Instant::now() < deadline,
                        "ring stayed full for 60 s: the source daemon is not draining"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("reserve: {e}"),
            }
        }
    }

    /// Applies one operation to the model and the ring, waiting for ring
    /// space.
    pub fn apply(&mut self, op: &Op) {
        self.apply_inner(op, false);
    }

    /// Applies one operation if the ring has room now; returns false (and
    /// changes nothing) if it is full.
    pub fn try_apply(&mut self, op: &Op) -> bool {
        self.apply_inner(op, true)
    }

    fn apply_inner(&mut self, op: &Op, nowait: bool) -> bool {
        let submit_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // What the kernel would capture: one record, completed at once.
        let mut data = Vec::new();
        let (fields, ok) = match *op {
            Op::Write { sector, len, ok } => {
                data = vec![0u8; len as usize];
                self.rng.fill(&mut data);
                (
                    DescFields {
                        op: OP_WRITE,
                        sector,
                        len,
                        ..Default::default()
                    },
                    ok,
                )
            }
            Op::Flush => (
                DescFields {
                    op: OP_FLUSH,
                    ..Default::default()
                },
                true,
            ),
            Op::Marker(aux) => (
                DescFields {
                    op: OP_MARKER,
                    aux,
                    ..Default::default()
                },
                true,
            ),
            Op::Discard { sector, len } => (
                DescFields {
                    op: OP_DISCARD,
                    sector,
                    len,
                    ..Default::default()
                },
                true,
            ),
            Op::Zeroes { sector, len } => (
                DescFields {
                    op: OP_WRITE_ZEROES,
                    sector,
                    len,
                    ..Default::default()
                },
                true,
            ),
        };
        let Some(seq) = self.reserve(
            DescFields {
                submit_ns,
                ..fields
            },
            &data,
            nowait,
        ) else {
            return false;
        };
        self.producer.complete(seq, ok);
        self.last_seq = seq;
        // The model of the source volume.
        let range =
            (fields.sector * 512) as usize..(fields.sector * 512) as usize + fields.len as usize;
        match *op {
            Op::Write {
                sector,
                len,
                ok: false,
            } => self.failed.push((sector, len)),
            Op::Write { .. } => {
                self.image[range.clone()].copy_from_slice(&data);
                self.masked[range].fill(false);
            }
            Op::Flush | Op::Marker(_) => {
                if self.keep_points {
                    self.points
                        .insert(seq, (self.image.clone(), self.masked.clone()));
                }
            }
            Op::Discard { .. } => {
                self.image[range.clone()].fill(0);
                self.masked[range].fill(true);
            }
            Op::Zeroes { .. } => self.image[range].fill(0),
        }
        true
    }

    /// A random operation within a volume of `size` bytes.
    pub fn random_op(&mut self, max_len_sectors: u64) -> Op {
        let sectors = self.image.len() as u64 / 512;
        let len = (1 + self.rng.below(max_len_sectors)).min(sectors);
        let sector = self.rng.below(sectors - len + 1);
        let len = (len * 512) as u32;
        match self.rng.below(100) {
            0..=74 => Op::Write {
                sector,
                len,
                ok: true,
            },
            75..=84 => Op::Flush,
            85..=90 => Op::Discard { sector, len },
            91..=95 => Op::Zeroes { sector, len },
            _ => Op::Marker(self.rng.next_u64()),
        }
    }
}

/// Compares `got` with `want`, ignoring masked bytes; returns the first
/// differing offset.
pub fn first_difference(got: &[u8], want: &[u8], masked: &[bool]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    (0..got.len()).find(|&i| got[i] != want[i] && !masked[i])
}

/// A hand-driven source connection, for feeding the target frames a real
/// source never sends (corrupted, replayed, misrouted, wrongly keyed).
pub struct RawClient {
    /// The connection.
    pub link: replicad::link::Link,
    /// Stream id agreed at the handshake.
    pub stream_id: [u8; 16],
    /// What the target said.
    pub welcome: replica_proto::msg::Welcome,
    /// Volume.
    pub volume: String,
    /// Generation announced.
    pub generation: [u8; 16],
    /// Next counter.
    pub counter: u64,
}

/// Flags of a [`RawClient`]'s hello.
#[derive(Debug, Clone, Copy)]
pub struct HelloOpts {
    /// The stream starts with a resync.
    pub resync: bool,
    /// The replica is declared a copy of the volume before record 1 (test
    /// volumes and replicas start zeroed).
    pub replica_seeded: bool,
}

impl Default for HelloOpts {
    fn default() -> Self {
        Self {
            resync: false,
            replica_seeded: true,
        }
    }
}

impl RawClient {
    /// Connects as `cert` (dir, name) and says hello for `volume` (the
    /// replica declared seeded: test volumes start zeroed).
    pub fn connect(
        env: &Env,
        addr: &str,
        cert: (&str, &str),
        volume: &str,
        generation: [u8; 16],
        oldest_seq: u64,
    ) -> Result<Self, String> {
        Self::connect_with(
            env,
            addr,
            cert,
            volume,
            generation,
            oldest_seq,
            HelloOpts::default(),
        )
    }

    /// [`RawClient::connect`] with the hello's flags.
    pub fn connect_with(
        env: &Env,
        addr: &str,
        cert: (&str, &str),
        volume: &str,
        generation: [u8; 16],
        oldest_seq: u64,
        opts: HelloOpts,
    ) -> Result<Self, String> {
        let HelloOpts {
            resync,
            replica_seeded,
        } = opts;
        use replica_proto::msg::{Hello, Message};
        let tls = replicad::config::TlsConfig {
            ca: env.path("pki/ca.pem"),
            cert: env.path(&format!("{}/{}.pem", cert.0, cert.1)),
            key: env.path(&format!("{}/{}.key", cert.0, cert.1)),
        };
        let cfg = replicad::tls::client_config(&tls).map_err(|e| e.to_string())?;
        let sock = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from(TARGET_CN.to_owned())
            .map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
        let mut link = replicad::link::Link::new(sock, rustls::Connection::Client(conn))
            .map_err(|e| e.to_string())?;
        link.handshake(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let src_rand = replica_proto::keys::random16().map_err(|e| e.to_string())?;
        link.send(&Message::Hello(Hello {
            protocol: replica_proto::msg::PROTOCOL_VERSION,
            features: replica_proto::msg::PROTOCOL_FEATURES,
            volume: volume.to_owned(),
            generation: hex::encode(generation),
            epoch: 1,
            source_random: hex::encode(src_rand),
            oldest_seq,
            key_id: 1,
            resync,
            replica_seeded,
        }));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match link.recv().map_err(|e| e.to_string())? {
                Some(Message::Welcome(w)) => {
                    let mut t = [0u8; 16];
                    hex::decode_to_slice(&w.target_random, &mut t).map_err(|e| e.to_string())?;
                    return Ok(Self {
                        link,
                        stream_id: replica_proto::keys::stream_id(&src_rand, &t),
                        welcome: w,
                        volume: volume.to_owned(),
                        generation,
                        counter: 0,
                    });
                }
                Some(Message::Error(e)) => return Err(format!("{}: {}", e.code, e.message)),
                Some(m) => return Err(format!("unexpected {m:?}")),
                None => {}
            }
            if Instant::now() > deadline {
                return Err("no welcome".into());
            }
            link.pump(Duration::from_millis(50), None)
                .map_err(|e| e.to_string())?;
        }
    }

    /// Seals records `first..` (a write of `data` at sector 0 for each
    /// even sequence, a flush for each odd one) under this stream's key from
    /// `keys` with master key `key_id`, as the next segment.
    pub fn seal(
        &mut self,
        keys: &replica_proto::keys::KeyRing,
        key_id: u32,
        first: u64,
        n: u64,
        data: &[u8],
    ) -> Vec<u8> {
        use replica_proto::frame;
        let mut plain = Vec::new();
        for seq in first..first + n {
            if seq % 2 == 0 {
                frame::encode_record_parts(
                    &mut plain,
                    seq,
                    frame::ring_op::WRITE,
                    0,
                    0,
                    0,
                    data.len() as u32,
                    0,
                    0,
                    data,
                );
            } else {
                frame::encode_record_parts(
                    &mut plain,
                    seq,
                    frame::ring_op::FLUSH,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    &[],
                );
            }
        }
        self.seal_plain(keys, key_id, first, n, 0, &plain)
    }

    /// Seals records given as (seq, op, flags, sector, aux, data) into the
    /// next frame of this stream, with segment `features`.
    #[allow(clippy::type_complexity)]
    pub fn seal_records(
        &mut self,
        keys: &replica_proto::keys::KeyRing,
        features: u32,
        records: &[(u64, u8, u8, u64, u64, &[u8])],
    ) -> Vec<u8> {
        let mut plain = Vec::new();
        for &(seq, op, flags, sector, aux, data) in records {
            let len = if op == replica_proto::frame::ring_op::WRITE {
                data.len() as u32
            } else {
                0
            };
            replica_proto::frame::encode_record_parts(
                &mut plain, seq, op, flags, 0, sector, len, 0, aux, data,
            );
        }
        let first = records.first().map_or(0, |r| r.0);
        self.seal_plain(
            keys,
            keys.active(),
            first,
            records.len() as u64,
            features,
            &plain,
        )
    }

    fn seal_plain(
        &mut self,
        keys: &replica_proto::keys::KeyRing,
        key_id: u32,
        first: u64,
        n: u64,
        features: u32,
        plain: &[u8],
    ) -> Vec<u8> {
        use replica_proto::frame;
        let ctx = replica_proto::keys::StreamContext {
            stream_id: self.stream_id,
            volume: &self.volume,
            direction: replica_proto::keys::Direction::Forward,
            epoch: 1,
        };
        let key = replica_proto::keys::StreamKey::derive(keys, key_id, &ctx).expect("derive");
        let h = frame::SegmentHeader {
            features,
            key_id,
            stream_id: self.stream_id,
            generation: self.generation,
            volume_tag: replica_proto::keys::volume_tag(&self.volume),
            epoch: 1,
            counter: self.counter,
            first_seq: first,
            last_seq: first + n - 1,
            record_count: n as u32,
            plain_len: 0,
            cipher_len: 0,
            zstd_level: 1,
            source_time_ns: 0,
        };
        self.counter += 1;
        frame::seal(h, plain, 1, &key).expect("seal")
    }

    /// Sends a frame and returns the target's answer to it: the first ack
    /// that covers it, or an error (or a closed connection).
    pub fn send_frame(&mut self, f: Vec<u8>) -> Result<replica_proto::msg::Ack, String> {
        use replica_proto::msg::Message;
        // A damaged frame covers nothing: only an error answers it.
        let covers =
            replica_proto::frame::SegmentHeader::decode(&f).map_or(u64::MAX, |(h, _)| h.last_seq);
        // Acks that answered earlier frames are stale now.
        let _ = self.link.pump(Duration::ZERO, None);
        while let Ok(Some(Message::Ack(_))) = self.link.recv() {}
        self.link.send(&Message::Segment(f));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.link.recv() {
                Ok(Some(Message::Ack(a))) if a.durable_seq >= covers => return Ok(a),
                Ok(Some(Message::Ack(_))) => {}
                Ok(Some(Message::Error(e))) => return Err(format!("{}: {}", e.code, e.message)),
                Ok(Some(m)) => return Err(format!("unexpected {m:?}")),
                Ok(None) => {}
                Err(e) => return Err(format!("link: {e}")),
            }
            if Instant::now() > deadline {
                return Err("no answer".into());
            }
            if let Err(e) = self.link.pump(Duration::from_millis(50), None) {
                return Err(format!("link: {e}"));
            }
        }
    }

    /// Sends a frame the target must refuse: waits for its error (acks of
    /// earlier frames are ignored). Returns the error, or a description of
    /// what came instead.
    pub fn send_bad_frame(&mut self, f: Vec<u8>) -> Result<String, String> {
        use replica_proto::msg::Message;
        self.link.send(&Message::Segment(f));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.link.recv() {
                Ok(Some(Message::Error(e))) => return Ok(format!("{}: {}", e.code, e.message)),
                Ok(Some(Message::Ack(_))) | Ok(None) => {}
                Ok(Some(m)) => return Err(format!("unexpected {m:?}")),
                Err(e) => return Err(format!("link closed without an error message: {e}")),
            }
            if Instant::now() > deadline {
                return Err("the target accepted the frame (no error within 10 s)".into());
            }
            if let Err(e) = self.link.pump(Duration::from_millis(50), None) {
                return Err(format!("link: {e}"));
            }
        }
    }
}

/// A size-limited tmpfs, unmounted on drop (disk-full tests; needs root).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax, e.g. `12m`).
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("mountpoint");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test needs root to mount a size-limited tmpfs"
        );
        Self { dir }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
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
    /// bytes, fast retries and `extra` configuration.
    pub fn start_source(&mut self, segment_max: usize, extra: &str) {
        // What a previous source published is not this one's status.
        let _ = std::fs::remove_file(self.sstate.join("status.json"));
        let cfg = self.env.source_config(
            "source.toml",
            &self.vol,
            self.size as u64,
            &self.env.path("ring"),
            &self.addr,
            &self.sstate,
            ("pki", SOURCE_CN),
            &self.env.path("keys.toml"),
            &format!("[segment]\nmax_bytes = {segment_max}\n[retry]\nschedule_secs = [0.02, 0.05, 0.1]\n{extra}"),
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
