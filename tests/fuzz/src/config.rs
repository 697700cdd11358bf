//! `config`: the configuration files of both roles (`replica-config`:
//! `source.toml`, `target.toml`) and the keyring file
//! (`replica_proto::keys::KeyRing::parse`).
//!
//! The input, as text, goes to all three parsers. What one accepts must
//! survive being written back: a configuration parses and checks again
//! from [`to_text`] into an equal value (`replctl protect` writes the
//! source configuration this way), and a keyring reads back from
//! [`KeyRing::to_toml`] with the same keys (its stream keys derive equal:
//! a frame sealed under one opens under the other). The spool limit of an
//! accepted source configuration is computable.

use std::path::Path;

use replica_config::{to_text, SourceConfig, TargetConfig};
use replica_proto::keys::{Direction, KeyRing, StreamContext, StreamKey};

/// Largest allocation the target may make (nothing is sized from a value
/// read).
pub const ALLOC_LIMIT: usize = 1 << 20;

/// Runs one input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz.toml");
    if let Ok(c) = SourceConfig::from_text(path, &text) {
        let written = to_text(&c).expect("an accepted source configuration serialises");
        match SourceConfig::from_text(path, &written) {
            Ok(back) => assert_eq!(back, c, "written back as:\n{written}"),
            Err(e) => panic!("a source configuration written back is refused ({e}):\n{written}"),
        }
        let _ = c.spool.limit(c.volume_size);
        let _ = c.spool_dir();
    }
    if let Ok(c) = TargetConfig::from_text(path, &text) {
        let written = to_text(&c).expect("an accepted target configuration serialises");
        match TargetConfig::from_text(path, &written) {
            Ok(back) => assert_eq!(back, c, "written back as:\n{written}"),
            Err(e) => panic!("a target configuration written back is refused ({e}):\n{written}"),
        }
    }
    if let Ok(kr) = KeyRing::parse(&text) {
        let written = kr.to_toml();
        let back = match KeyRing::parse(&written) {
            Ok(b) => b,
            Err(e) => panic!("a keyring written back is refused ({e})"),
        };
        assert_eq!(back.active(), kr.active());
        assert_eq!(back.ids(), kr.ids());
        let ctx = StreamContext {
            stream_id: [1; 16],
            volume: "v",
            direction: Direction::Forward,
            epoch: 1,
        };
        for id in kr.ids() {
            let a = StreamKey::derive(&kr, id, &ctx).expect("derive from a listed key");
            let b = StreamKey::derive(&back, id, &ctx).expect("derive from a listed key");
            let mut buf = b"same key".to_vec();
            a.seal(1, b"", &mut buf).expect("seal");
            let n = b
                .open(1, b"", &mut buf)
                .expect("the keys written back differ");
            assert_eq!(&buf[..n], b"same key");
        }
    }
}

/// Seed inputs: the configurations of the documentation's examples as the
/// types write them, with every optional section set, and a keyring.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let source = r#"
volume = "db1"
volume_size = 107374182400
ring = { group = "db1" }
target = "dr.example.net:7700"
target_name = "dr.example.net"
keys = "/etc/dm-replica/keys.toml"
state_dir = "/var/lib/replicad"
control_socket = "/run/replicad/db1.sock"
control_device = "/dev/dm-replica"
epoch = 3
device = "/dev/mapper/db1"
initial_copy = false

[tls]
ca = "/etc/dm-replica/ca.pem"
cert = "/etc/dm-replica/source.pem"
key = "/etc/dm-replica/source.key"

[segment]
max_bytes = 4194304
zstd_level = 3
workers = 2
queue = 4

[retry]
schedule_secs = [1.0, 2.5, 60.0]

[spool]
dir = "/var/spool/replicad"
limit_percent = 50
limit_bytes = 1073741824
file_bytes = 67108864
chunk_bytes = 1048576
region_kib = 64

[resync]
window_bytes = 67108864
max_write_bytes = 1048576
chunk_kib = 128
"#;
    let ring_file = r#"
volume = "dev"
volume_size = 1048576
ring = { file = "/run/ring" }
target = "127.0.0.1:7700"
target_name = "target.example"
keys = "/etc/keys.toml"
state_dir = "/var/lib/replicad"
[tls]
ca = "ca.pem"
cert = "c.pem"
key = "k.pem"
"#;
    let target = r#"
listen = "0.0.0.0:7700"
keys = "/etc/dm-replica/keys.toml"
state_dir = "/var/lib/replicad"
journal_file_bytes = 67108864

[tls]
ca = "/etc/dm-replica/ca.pem"
cert = "/etc/dm-replica/target.pem"
key = "/etc/dm-replica/target.key"

[[volume]]
id = "db1"
size = 107374182400
allowed_sources = ["source.example.net"]
keep_points = 16
crash_point_interval_secs = 30
replica = { backend = "thin", pool = "replica-pool", name = "replica-db1", device_id = 1, low_water_percent = 80 }

[[volume]]
id = "logs"
size = 1048576
allowed_sources = ["source.example.net", "other.example.net"]
replica = { backend = "file", path = "/srv/replica/logs.img" }
"#;
    for (name, t) in [("source", source), ("source-ring-file", ring_file)] {
        SourceConfig::from_text(Path::new(name), t).expect("a source seed is valid");
    }
    TargetConfig::from_text(Path::new("target"), target).expect("the target seed is valid");
    let keys = KeyRing::parse(crate::keys::KEYRING).expect("keyring");
    vec![
        ("source".into(), source.as_bytes().to_vec()),
        ("source-ring-file".into(), ring_file.as_bytes().to_vec()),
        ("target".into(), target.as_bytes().to_vec()),
        ("keyring".into(), keys.to_toml().as_bytes().to_vec()),
    ]
}
