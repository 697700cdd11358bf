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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replica_ring::{DescFields, Producer, RingError, RingParams};
use replica_tests::Rng;

struct Args {
    bin_dir: PathBuf,
    work: PathBuf,
    size_mib: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        bin_dir: PathBuf::from("target/release"),
        work: PathBuf::from("/dev/shm/dm-replica-bench"),
        size_mib: 1024,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
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
            _ => die(&format!("unknown option {k}")),
        }
    }
    a
}

fn die(m: &str) -> ! {
    eprintln!("pipeline-bench: {m}");
    std::process::exit(2)
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

fn run_shell(cmd: &str) -> (f64, f64) {
    let cpu0 = children_cpu();
    let t0 = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .unwrap_or_else(|e| die(&format!("{cmd}: {e}")));
    if !st.success() {
        die(&format!("{cmd} failed: {st}"));
    }
    (t0.elapsed().as_secs_f64(), children_cpu() - cpu0)
}

fn spawn(bin: &Path, role: &str, cfg: &Path, log: &Path) -> Child {
    Command::new(bin)
        .args([role, "--config"])
        .arg(cfg)
        .env("REPLICAD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap_or_else(|e| die(&format!("log: {e}"))))
        .spawn()
        .unwrap_or_else(|e| die(&format!("spawn {}: {e}", bin.display())))
}

fn applied(state: &Path) -> u64 {
    replicad::status::read(state)
        .ok()
        .and_then(|v| v.first().map(|s| s.applied_seq))
        .unwrap_or(0)
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
    let w = |p: &str| a.work.join(p);

    eprintln!(
        "generating {} MiB (half random, half text-like)...",
        a.size_mib
    );
    let data = generate(size, 42);
    std::fs::write(w("data.bin"), &data).unwrap_or_else(|e| die(&format!("data: {e}")));

    // Baselines.
    eprintln!("baseline: zstd -1 -T1 ...");
    let data_path = w("data.bin");
    let (_, zstd_cpu) = run_shell(&format!(
        "zstd -q -1 -T1 -c {} > /dev/null",
        data_path.display()
    ));
    eprintln!("baseline: zstd -1 -T1 | openssl enc -aes-256-ctr ...");
    let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let (pipe_wall, _) = run_shell(&format!(
        "zstd -q -1 -T1 -c {} | openssl enc -aes-256-ctr -K {key} -iv 000102030405060708090a0b0c0d0e0f > /dev/null",
        data_path.display()
    ));
    let _ = std::fs::remove_file(&data_path);

    // Certificates, keys, configuration.
    replctl::certs::generate(&w("pki"), &["source-a".into(), "target.example".into()], 30)
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
        if Instant::now() > deadline {
            die("target did not start; see target.log");
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
    let scfg = w("source.toml");
    std::fs::write(
        &scfg,
        format!(
            "volume = \"bench\"\nvolume_size = {size}\nring = {{ file = \"{}\" }}\ntarget = \"{addr}\"\ntarget_name = \"target.example\"\nkeys = \"{}\"\nstate_dir = \"{}\"\n[segment]\nmax_bytes = 4194304\nzstd_level = 1\nworkers = 2\n{}",
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
            last_sample = Instant::now();
        }
    }
    let last_seq = producer.next_seq() - 1;
    while applied(&tstate) < last_seq {
        peak = (
            peak.0.max(rss_anon_kib(spid)),
            peak.1.max(rss_anon_kib(tpid)),
        );
        if t0.elapsed() > Duration::from_secs(1800) {
            die("target did not apply everything within 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let wall = t0.elapsed().as_secs_f64();
    let (s_cpu, t_cpu) = (cpu_secs(spid) - s_cpu0, cpu_secs(tpid) - t_cpu0);
    let _ = source.kill();
    let _ = target.kill();
    let _ = source.wait();
    let _ = target.wait();

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
    println!("replica verified identical to the source data");
    let _ = std::fs::remove_dir_all(&a.work);
}
