//! A test's environment: its directory, certificates and keys, the
//! daemons' configuration files, and a size-limited tmpfs.

use std::path::{Path, PathBuf};
use std::process::Command;

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
        let mut spool = if extra.contains("[spool]") {
            String::new()
        } else {
            "[spool]\nlimit_percent = 10000\n".to_owned()
        };
        // Dirty maps of 64 KiB regions (the tests' volumes are small).
        if !extra.contains("[resync]") {
            spool.push_str("[resync]\nchunk_kib = 64\n");
        }
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

/// A target of one file-backed volume started in an [`Env`]: the daemon,
/// its address, its state directory and the test's key ring.
pub struct OneVolumeTarget {
    /// The daemon.
    pub daemon: crate::Daemon,
    /// Where it listens.
    pub addr: String,
    /// Its state directory (the replica is `<id>.img` in it).
    pub state_dir: std::path::PathBuf,
    /// The test's key ring.
    pub keys: replica_proto::keys::KeyRing,
}

impl Env {
    /// Starts a target (state in `tstate`) with one volume `id` of `size`
    /// bytes and a file replica.
    pub fn one_volume_target(&self, id: &str, size: u64) -> OneVolumeTarget {
        let st = self.path("tstate");
        let cfg = self.target_config("target.toml", &st, &[(id, size)], 64, "");
        let (daemon, addr) = crate::Daemon::start_target(&cfg, &st, &self.path("target.log"));
        let keys = replica_proto::keys::KeyRing::load(&self.path("keys.toml")).expect("keys");
        OneVolumeTarget {
            daemon,
            addr,
            state_dir: st,
            keys,
        }
    }

    /// The resync state a source saved in `state_dir` for `volume`
    /// (authenticated with the test's key ring).
    pub fn resync_state(
        &self,
        state_dir: &Path,
        volume: &str,
    ) -> Option<replicad::source::dirty::ResyncState> {
        let ring = replica_proto::keys::KeyRing::load(&self.path("keys.toml")).expect("keys");
        let keys = replicad::source::dirty::CursorKeys {
            ring: &ring,
            volume,
        };
        replicad::source::dirty::ResyncState::load(&state_dir.join("resync.state"), &keys)
            .expect("read the resync state")
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
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
