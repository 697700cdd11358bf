//! Pipeline benchmark: the source and target roles side by side with plain
//! `zstd` and a `zstd | openssl` pipe on the same generated data, in one
//! run. Prints a table of ratios; asserts nothing (timing claims are never
//! tests). Run it through scripts/bench-pipeline.sh.
//!
//! Measured:
//! * CPU seconds per GiB of the source role (drain ring, compress, seal,
//!   TLS) next to `zstd -1 -T1` alone;
//! * end-to-end throughput (first record captured to last record applied on
//!   the target) next to `zstd -1 -T1 | openssl enc -aes-256-ctr` with no
//!   network and no target;
//! * peak anonymous RSS of each daemon (the ring mapping is file-backed and
//!   not counted).
//!
//! It never waits forever: every wait has a deadline, and the run stops at
//! once, non-zero, with the reason and the end of both daemons' logs, when
//! a daemon exits, reports Critical or needs a resync (the stream cannot
//! carry every write any more, so the replica would never catch up), or
//! nothing moves for `--stall-secs`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use replica_ring::{DescFields, Producer, RingError, RingParams};
use replica_tests::Rng;

struct Args {
    bin_dir: PathBuf,
    work: PathBuf,
    smoke: bool,
    size_mib: usize,
    stall_secs: u64,
    keep: bool,
}

/// Size of a `--smoke` run, MiB: enough to cross several segments and
/// spool files' worth of chunks, done in seconds.
const SMOKE_MIB: usize = 16;

fn usage() -> ! {
    eprintln!(
        "usage: pipeline-bench [--bin-dir DIR] [--work DIR] [--size-mib N | --smoke] [--stall-secs S] [--keep]\n\
         \x20 --size-mib N     data replicated, MiB (default $BENCH_MIB, else 1024)\n\
         \x20 --smoke          a {SMOKE_MIB} MiB run (CI: the benchmark still finishes)\n\
         \x20 --stall-secs S   fail when nothing moves for S seconds (default 60)\n\
         \x20 --work DIR       work directory, emptied first (default /dev/shm/dm-replica-bench)\n\
         \x20 --keep           keep the work directory after a failure"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        bin_dir: PathBuf::from("target/release"),
        work: PathBuf::new(),
        smoke: false,
        size_mib: match std::env::var("BENCH_MIB") {
            Ok(v) => v
                .parse()
                .unwrap_or_else(|_| die("BENCH_MIB takes a number of MiB")),
            Err(_) => 1024,
        },
        stall_secs: 60,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--smoke" => {
                a.size_mib = SMOKE_MIB;
                a.smoke = true;
                continue;
            }
            "--keep" => {
                a.keep = true;
                continue;
            }
            "-h" | "--help" => usage(),
            _ => {}
        }
        let v = it
            .next()
            .unwrap_or_else(|| die(&format!("{k} needs a value")));
        match k.as_str() {
            "--bin-dir" => a.bin_dir = PathBuf::from(v),
            "--work" => a.work = PathBuf::from(v),
            "--size-mib" => {
                a.size_mib = v
                    .parse()
                    .unwrap_or_else(|_| die("--size-mib takes a number"))
            }
            "--stall-secs" => {
                a.stall_secs = v
                    .parse()
                    .unwrap_or_else(|_| die("--stall-secs takes a number"))
            }
            _ => die(&format!("unknown option {k}")),
        }
    }
    if a.size_mib == 0 {
        die("--size-mib must be at least 1");
    }
    if a.work.as_os_str().is_empty() {
        // A smoke run (CI) never touches the directory of a full run.
        a.work = if a.smoke {
            PathBuf::from(format!(
                "/dev/shm/dm-replica-bench-smoke.{}",
                std::process::id()
            ))
        } else {
            PathBuf::from("/dev/shm/dm-replica-bench")
        };
    }
    a
}

/// What a failure cleans up and shows: the daemons (killed), their logs
/// (the end of each printed), the work directory (removed unless --keep).
struct Cleanup {
    pids: Vec<u32>,
    logs: Vec<PathBuf>,
    work: Option<PathBuf>,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    pids: Vec::new(),
    logs: Vec::new(),
    work: None,
});

fn cleanup() -> std::sync::MutexGuard<'static, Cleanup> {
    CLEANUP.lock().unwrap_or_else(|p| p.into_inner())
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let t = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({e})"),
    }
}

/// Fails the run: the reason, the end of the daemons' logs; the daemons
/// are killed and the work directory removed (unless --keep).
fn die(m: &str) -> ! {
    eprintln!("pipeline-bench: FAILED: {m}");
    let c = cleanup();
    for &pid in &c.pids {
        // SAFETY: kill(2) has no memory effects; the pids are our children,
        // not yet reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    for log in &c.logs {
        eprintln!("--- end of {}:\n{}", log.display(), tail(log, 25));
    }
    match &c.work {
        Some(w) => {
            let _ = std::fs::remove_dir_all(w);
        }
        None if !c.logs.is_empty() => eprintln!("(the work directory is kept: --keep)"),
        None => {}
    }
    if !c.logs.is_empty() {
        eprintln!("pipeline-bench: FAILED: {m}");
    }
    std::process::exit(1)
}

/// Half random bytes, half text-like (words, numbers, punctuation).
fn generate(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size];
    let half = size / 2;
    rng.fill(&mut data[..half]);
    const WORDS: &[&str] = &[
        "replica",
        "volume",
        "the",
        "of",
        "and",
        "write",
        "segment",
        "journal",
        "target",
        "source",
        "recovery",
        "point",
        "flush",
        "sector",
        "block",
        "device",
        "mapper",
        "ring",
        "sequence",
        "commit",
        "status",
        "error",
        "timeout",
        "retry",
        "user",
        "order",
        "invoice",
        "customer",
        "amount",
        "date",
        "2026-11-24",
        "id",
        "name",
    ];
    let mut p = half;
    while p < size {
        let w: Vec<u8> = match rng.below(10) {
            0 => format!("{}", rng.below(1_000_000)).into_bytes(),
            1 => b",\n".to_vec(),
            _ => WORDS[rng.below(WORDS.len() as u64) as usize]
                .as_bytes()
                .to_vec(),
        };
        for &b in w.iter().chain(b" ".iter()) {
            if p < size {
                data[p] = b;
                p += 1;
            }
        }
    }
    data
}

fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn rss_anon_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("RssAnon:")
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn children_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Runs `cmd` with bash (pipefail), failing the run if it fails or takes
/// longer than `limit`.
fn run_shell(cmd: &str, limit: Duration) -> (f64, f64) {
    let cpu0 = children_cpu();
    let t0 = Instant::now();
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; {cmd}"))
        .spawn()
        .unwrap_or_else(|e| die(&format!("{cmd}: {e}")));
    let st = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if t0.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                die(&format!(
                    "{cmd} did not finish within {} s",
                    limit.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => die(&format!("{cmd}: {e}")),
        }
    };
    if !st.success() {
        die(&format!("{cmd} failed: {st}"));
    }
    (t0.elapsed().as_secs_f64(), children_cpu() - cpu0)
}

fn spawn(bin: &Path, role: &str, cfg: &Path, log: &Path) -> Child {
    let child = Command::new(bin)
        .args([role, "--config"])
        .arg(cfg)
        .env("REPLICAD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap_or_else(|e| die(&format!("log: {e}"))))
        .spawn()
        .unwrap_or_else(|e| die(&format!("spawn {}: {e}", bin.display())));
    let mut c = cleanup();
    c.pids.push(child.id());
    c.logs.push(log.to_owned());
    child
}

fn status(state: &Path) -> Option<replicad::status::VolumeStatus> {
    replicad::status::read(state)
        .ok()
        .and_then(|v| v.into_iter().next())
}

/// Watches both daemons while the run waits for them: fails the run when
/// one exits, reports Critical, or (the source) needs a resync, which a
/// ring-file source cannot run, so the replica would never catch up; and
/// when nothing moves for `stall` or the whole run exceeds `limit`.
struct Watch<'a> {
    source: &'a mut Child,
    target: &'a mut Child,
    sstate: &'a Path,
    tstate: &'a Path,
    stall: Duration,
    limit: Duration,
    started: Instant,
    progress: (u64, u64, u64),
    moved: Instant,
}

impl Watch<'_> {
    /// The target's applied sequence; fails the run on trouble. `produced`
    /// is the producer's progress (bytes written into the ring).
    fn check(&mut self, produced: u64) -> u64 {
        for (name, child) in [("source", &mut *self.source), ("target", &mut *self.target)] {
            if let Ok(Some(st)) = child.try_wait() {
                die(&format!("replicad {name} exited ({st})"));
            }
        }
        let s = status(self.sstate);
        let t = status(self.tstate);
        for (name, v) in [("source", &s), ("target", &t)] {
            if let Some(v) = v {
                if v.health == replicad::status::Health::Critical {
                    die(&format!(
                        "replicad {name} reports Critical: {}",
                        v.reasons_text()
                    ));
                }
            }
        }
        if let Some(v) = &s {
            if v.needs_resync {
                die(&format!(
                    "the source needs a resync, so the replica cannot catch up (a ring-file source has no device to resync from; is the spool limit smaller than the run?): {}",
                    v.reasons_text()
                ));
            }
        }
        let applied = t.as_ref().map_or(0, |v| v.applied_seq);
        let now = (produced, s.as_ref().map_or(0, |v| v.durable_seq), applied);
        if now != self.progress {
            self.progress = now;
            self.moved = Instant::now();
        } else if self.moved.elapsed() > self.stall {
            die(&format!(
                "nothing moved for {} s: {produced} bytes written into the ring, source at record {} durable on the target, target applied {} (source: {}; target: {})",
                self.stall.as_secs(),
                now.1,
                now.2,
                s.as_ref().map_or("no status".into(), |v| format!("{:?} {:?} {}", v.connection, v.health, v.reasons_text())),
                t.as_ref().map_or("no status".into(), |v| format!("{:?} {:?} {}", v.connection, v.health, v.reasons_text())),
            ));
        }
        if self.started.elapsed() > self.limit {
            die(&format!(
                "the run did not finish within {} s (target applied record {applied})",
                self.limit.as_secs()
            ));
        }
        applied
    }
}

fn main() {
    let a = parse_args();
    let size = a.size_mib << 20;
    let replicad = a.bin_dir.join("replicad");
    if !replicad.exists() {
        die(&format!(
            "{} missing: build with cargo build --release",
            replicad.display()
        ));
    }
    let _ = std::fs::remove_dir_all(&a.work);
    std::fs::create_dir_all(&a.work).unwrap_or_else(|e| die(&format!("{}: {e}", a.work.display())));
    if !a.keep {
        cleanup().work = Some(a.work.clone());
    }
    let w = |p: &str| a.work.join(p);
    // Baselines that take longer than this are broken, not slow.
    let shell_limit = Duration::from_secs(120 + a.size_mib as u64 / 2);

    eprintln!(
        "generating {} MiB (half random, half text-like)...",
        a.size_mib
    );
    let data = generate(size, 42);
    std::fs::write(w("data.bin"), &data).unwrap_or_else(|e| die(&format!("data: {e}")));

    // Baselines.
    eprintln!("baseline: zstd -1 -T1 ...");
    let data_path = w("data.bin");
    let (_, zstd_cpu) = run_shell(
        &format!("zstd -q -1 -T1 -c {} > /dev/null", data_path.display()),
        shell_limit,
    );
    eprintln!("baseline: zstd -1 -T1 | openssl enc -aes-256-ctr ...");
    let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let (pipe_wall, _) = run_shell(&format!(
        "zstd -q -1 -T1 -c {} | openssl enc -aes-256-ctr -K {key} -iv 000102030405060708090a0b0c0d0e0f > /dev/null",
        data_path.display()
    ), shell_limit);
    let _ = std::fs::remove_file(&data_path);

    // Certificates, keys, configuration.
    replctl::certs::generate(
        &w("pki"),
        &["source-a".into(), "target.example".into()],
        365,
    )
    .unwrap_or_else(|e| die(&e.to_string()));
    replica_proto::keys::KeyRing::generate()
        .and_then(|k| k.save(&w("keys.toml"), false))
        .unwrap_or_else(|e| die(&e.to_string()));
    let pki = w("pki");
    let tls = |name: &str| {
        format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.join("ca.pem").display(),
            pki.join(format!("{name}.pem")).display(),
            pki.join(format!("{name}.key")).display()
        )
    };
    let tstate = w("tstate");
    let sstate = w("sstate");
    let tcfg = w("target.toml");
    let mut f = std::fs::File::create(&tcfg).unwrap_or_else(|e| die(&e.to_string()));
    let _ = write!(
        f,
        "listen = \"127.0.0.1:0\"\nkeys = \"{}\"\nstate_dir = \"{}\"\n{}\n[[volume]]\nid = \"bench\"\nsize = {size}\nallowed_sources = [\"source-a\"]\nkeep_points = 1\nreplica = {{ backend = \"file\", path = \"{}\" }}\n",
        w("keys.toml").display(),
        tstate.display(),
        tls("target.example"),
        w("replica.img").display()
    );
    drop(f);
    let mut target = spawn(&replicad, "target", &tcfg, &w("target.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Ok(s) = std::fs::read_to_string(tstate.join("listen.addr")) {
            if !s.is_empty() {
                break s;
            }
        }
        if let Ok(Some(st)) = target.try_wait() {
            die(&format!("replicad target exited ({st}) before it listened"));
        }
        if Instant::now() > deadline {
            die("replicad target did not listen within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ring = w("ring");
    let mut producer = Producer::create(
        &ring,
        RingParams {
            desc_count: 4096,
            data_granules: 16384,
            generation: [1; 16],
            first_seq: 1,
            first_granule: 0,
        },
    )
    .unwrap_or_else(|e| die(&e.to_string()));
    // The producer writes far faster than the pipeline ships, so the
    // spool soon holds most of the run unacknowledged. Its default limit
    // (50% of the volume) would drop it for a resync part-way, which a
    // ring-file source cannot run: the replica would never catch up. The
    // run writes the volume once, so a limit of twice the volume is never
    // reached and every byte goes through the stream.
    let scfg = w("source.toml");
    std::fs::write(
        &scfg,
        format!(
            "volume = \"bench\"\nvolume_size = {size}\nring = {{ file = \"{}\" }}\ntarget = \"{addr}\"\ntarget_name = \"target.example\"\nkeys = \"{}\"\nstate_dir = \"{}\"\ninitial_copy = false\n[segment]\nmax_bytes = 4194304\nzstd_level = 1\nworkers = 2\n[spool]\nlimit_percent = 200\n{}",
            ring.display(),
            w("keys.toml").display(),
            sstate.display(),
            tls("source-a")
        ),
    )
    .unwrap_or_else(|e| die(&e.to_string()));
    let mut source = spawn(&replicad, "source", &scfg, &w("source.log"));
    let (spid, tpid) = (source.id(), target.id());
    let (s_cpu0, t_cpu0) = (cpu_secs(spid), cpu_secs(tpid));

    eprintln!(
        "replicating {} MiB through source and target...",
        a.size_mib
    );
    let t0 = Instant::now();
    let chunk = 1 << 20;
    let mut peak = (0u64, 0u64);
    let mut last_sample = Instant::now();
    let mut off = 0usize;
    let mut watch = Watch {
        source: &mut source,
        target: &mut target,
        sstate: &sstate,
        tstate: &tstate,
        stall: Duration::from_secs(a.stall_secs),
        limit: Duration::from_secs(600 + a.size_mib as u64),
        started: t0,
        progress: (0, 0, 0),
        moved: t0,
    };
    while off < size {
        let len = chunk.min(size - off);
        let fields = DescFields {
            op: ring_abi::OP_WRITE,
            sector: (off / 512) as u64,
            len: len as u32,
            ..Default::default()
        };
        match producer.reserve(fields, &data[off..off + len]) {
            Ok(seq) => {
                producer.complete(seq, true);
                off += len;
            }
            Err(RingError::Full) => std::thread::sleep(Duration::from_micros(200)),
            Err(e) => die(&e.to_string()),
        }
        if last_sample.elapsed() > Duration::from_millis(50) {
            peak = (
                peak.0.max(rss_anon_kib(spid)),
                peak.1.max(rss_anon_kib(tpid)),
            );
            watch.check(off as u64);
            last_sample = Instant::now();
        }
    }
    let last_seq = producer.next_seq() - 1;
    while watch.check(off as u64) < last_seq {
        peak = (
            peak.0.max(rss_anon_kib(spid)),
            peak.1.max(rss_anon_kib(tpid)),
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let wall = t0.elapsed().as_secs_f64();
    let (s_cpu, t_cpu) = (cpu_secs(spid) - s_cpu0, cpu_secs(tpid) - t_cpu0);
    let _ = source.kill();
    let _ = target.kill();
    let _ = source.wait();
    let _ = target.wait();
    cleanup().pids.clear();

    // Verify the replica before reporting anything.
    let replica = std::fs::read(w("replica.img")).unwrap_or_else(|e| die(&e.to_string()));
    if replica != data {
        die("replica differs from the source data");
    }

    let gib = size as f64 / (1u64 << 30) as f64;
    let mib = size as f64 / (1u64 << 20) as f64;
    println!("\ndm-replica pipeline benchmark: {:.0} MiB, half random, half text-like; journal and replica on tmpfs", mib);
    println!(
        "{:<44} {:>12} {:>22} {:>8} {:>10}",
        "metric", "dm-replica", "baseline", "ratio", "goal"
    );
    let zcpu = zstd_cpu / gib;
    let scpu = s_cpu / gib;
    println!(
        "{:<44} {:>12.2} {:>22} {:>8.2} {:>10}",
        "source role CPU s/GiB",
        scpu,
        format!("zstd -1 -T1: {zcpu:.2}"),
        scpu / zcpu,
        "<= 1.25"
    );
    println!(
        "{:<44} {:>12.2} {:>22} {:>8} {:>10}",
        "target role CPU s/GiB",
        t_cpu / gib,
        "-",
        "-",
        "-"
    );
    let e2e = mib / wall;
    let pipe = mib / pipe_wall;
    println!(
        "{:<44} {:>12.1} {:>22} {:>8.2} {:>10}",
        "end-to-end MiB/s (capture -> applied)",
        e2e,
        format!("zstd|openssl: {pipe:.1}"),
        e2e / pipe,
        ">= 1.0"
    );
    println!(
        "{:<44} {:>12.1} {:>22} {:>8} {:>10}",
        "source peak RssAnon MiB",
        peak.0 as f64 / 1024.0,
        "-",
        "-",
        "<= 128"
    );
    println!(
        "{:<44} {:>12.1} {:>22} {:>8} {:>10}",
        "target peak RssAnon MiB",
        peak.1 as f64 / 1024.0,
        "-",
        "-",
        "<= 128"
    );
    println!("replica verified identical to the source data (spool limit 200% of the volume: no resync, every byte streamed)");
    let _ = std::fs::remove_dir_all(&a.work);
}
