//! The CPU cost of each per-byte stage of the data path on this machine,
//! measured one after another on one core: what bounds the throughput of
//! a copy before any I/O. A benchmark guest prints it next to its figures
//! (scripts/bench-resync-vm.sh): under software emulation every stage costs
//! far more than on hardware, and the crypto stages most of all.
//!
//!   dmr-cost [--mib N]      (default 32)
//!
//! Prints one line per stage, `COST <stage> <MiB/s>`:
//!   memcpy       copying the data once
//!   crc32c       the checksum of spool chunks and segments
//!   chunk-hash   keyed BLAKE3 of 128 KiB chunks (a checksum resync's hash)
//!   seal         a 1 MiB segment of random data sealed (compression tried
//!                and skipped, AES-256-GCM, checksum): the source's segment
//!   open         the same segment checked and opened: the target's
//!   zstd         zstd level 1 over 1 MiB of random data (what sealing
//!                incompressible data cost before it was skipped)
//!   tls-send     the product's TLS client (rustls, its configuration)
//!                encrypting 1 MiB writes into memory
//!   tls-receive  its TLS server decrypting them
//! (and `COST tls-suite <name>`: the cipher suite the two agreed on).
//! TLS 1.3 carries every segment once more with the same cipher
//! (AES-256-GCM), so the data path seals twice and opens twice: a bound
//! for the copy on C cores is C / (2 / seal + 2 / open) MiB/s.

use std::time::Instant;

use replica_proto::chunk::ChunkKey;
use replica_proto::frame::{self, ring_op, RecordView, SegmentHeader};
use replica_proto::keys::{Direction, KeyRing, StreamContext, StreamKey};

fn rate(bytes: usize, t: Instant) -> f64 {
    bytes as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1048576.0
}

fn main() {
    let mut mib = 32usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => {
                mib = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| {
                        eprintln!("dmr-cost: --mib wants a positive number");
                        std::process::exit(2)
                    })
            }
            _ => {
                eprintln!("usage: dmr-cost [--mib N]");
                std::process::exit(2)
            }
        }
    }
    let n = mib << 20;
    let mut rng = replica_tests::Rng::new(0x5eed);
    let mut data = vec![0u8; n];
    rng.fill(&mut data);

    let t = Instant::now();
    let mut sink = 0u8;
    for c in data.chunks(1 << 20) {
        let v = c.to_vec();
        sink ^= v[v.len() / 2];
    }
    println!("COST memcpy {:.1}", rate(n, t));

    let t = Instant::now();
    for c in data.chunks(1 << 20) {
        sink ^= crc32c::crc32c(c) as u8;
    }
    println!("COST crc32c {:.1}", rate(n, t));

    let kr = KeyRing::generate().expect("a key ring");
    let ck = ChunkKey::derive(&kr, kr.active(), "cost").expect("chunk key");
    let t = Instant::now();
    for (i, c) in data.chunks(128 << 10).enumerate() {
        sink ^= ck.hash(i as u64 * (128 << 10), c)[0];
    }
    println!("COST chunk-hash {:.1}", rate(n, t));

    let ctx = StreamContext {
        stream_id: [1; 16],
        volume: "cost",
        direction: Direction::Forward,
        epoch: 1,
    };
    let key = StreamKey::derive(&kr, kr.active(), &ctx).expect("stream key");
    let mut comp = zstd::bulk::Compressor::new(1).expect("zstd");
    let mut frames = Vec::new();
    let mut plain_bytes = 0;
    let t = Instant::now();
    for (i, c) in data.chunks(1 << 20).enumerate() {
        let rec = RecordView {
            seq: i as u64 + 1,
            op: ring_op::WRITE,
            flags: 0,
            volume: 0,
            sector: (i as u64) << 11,
            len: c.len() as u32,
            submit_ns: 1,
            aux: 0,
            data: c,
        };
        let mut plain = Vec::with_capacity(c.len() + 64);
        frame::encode_record(&mut plain, &rec);
        plain_bytes += plain.len();
        let h = SegmentHeader {
            features: 0,
            key_id: 0,
            stream_id: [1; 16],
            generation: [2; 16],
            volume_tag: replica_proto::keys::volume_tag("cost"),
            epoch: 1,
            counter: i as u64,
            first_seq: i as u64 + 1,
            last_seq: i as u64 + 1,
            record_count: 1,
            plain_len: 0,
            cipher_len: 0,
            zstd_level: 1,
            source_time_ns: 1,
        };
        frames.push(frame::seal_with(&mut comp, h, &plain, 1, &key).expect("seal"));
    }
    println!("COST seal {:.1}", rate(plain_bytes, t));

    let t = Instant::now();
    for f in &frames {
        let h = frame::check(f).expect("check");
        sink ^= frame::open(&h, f, &key).expect("open")[0];
    }
    println!("COST open {:.1}", rate(plain_bytes, t));

    let t = Instant::now();
    for c in data.chunks(1 << 20) {
        sink ^= comp.compress(c).expect("zstd")[0];
    }
    println!("COST zstd {:.1}", rate(n, t));
    tls(&data, &mut sink);
    // Keeps the work from being optimised away.
    eprintln!("dmr-cost: done ({sink})");
}

/// The TLS stages: a client and a server with the daemons' own TLS
/// configuration (certificates from `replctl certs`), in memory.
fn tls(data: &[u8], sink: &mut u8) {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hosts = ["source-host".to_owned(), "target-host".to_owned()];
    replctl::certs::generate(dir.path(), &hosts, 30).expect("certificates");
    let material = |host: &str| replicad::config::TlsConfig {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join(format!("{host}.pem")),
        key: dir.path().join(format!("{host}.key")),
    };
    let ccfg = replicad::tls::client_config(&material("source-host")).expect("client config");
    let scfg = replicad::tls::server_config(&material("target-host")).expect("server config");
    let name = rustls_pki_types::ServerName::try_from("target-host".to_owned()).expect("name");
    let mut c = rustls::ClientConnection::new(ccfg, name).expect("client");
    let mut s = rustls::ServerConnection::new(scfg).expect("server");
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).expect("client hello");
        }
        s.read_tls(&mut &wire[..]).expect("server reads");
        s.process_new_packets().expect("server handshake");
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).expect("server hello");
        }
        c.read_tls(&mut &wire[..]).expect("client reads");
        c.process_new_packets().expect("client handshake");
    }
    let suite = c
        .negotiated_cipher_suite()
        .map_or("none".to_owned(), |s| format!("{:?}", s.suite()));
    println!("COST tls-suite {suite}");
    c.set_buffer_limit(None);
    s.set_buffer_limit(None);
    let mut records = Vec::new();
    let t = Instant::now();
    for chunk in data.chunks(1 << 20) {
        c.writer().write_all(chunk).expect("encrypt");
        let mut out = Vec::with_capacity(chunk.len() + 4096);
        while c.wants_write() {
            c.write_tls(&mut out).expect("records");
        }
        records.push(out);
    }
    println!("COST tls-send {:.1}", rate(data.len(), t));
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    for r in &records {
        let mut rd = &r[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("read records");
            s.process_new_packets().expect("decrypt");
            loop {
                match s.reader().read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => *sink ^= buf[n - 1],
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
    }
    println!("COST tls-receive {:.1}", rate(data.len(), t));
}
