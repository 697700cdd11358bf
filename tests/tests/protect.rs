//! `replctl protect` starting the source daemon: what the daemon needs is
//! checked before anything is created or started, with the daemon's own
//! loaders and messages (`replicad check source`); the configuration it
//! writes is serialised from the configuration type, so any path
//! round-trips; a spawned daemon that exits is reported at once, with its
//! exit status and log, instead of after the 60 s wait for its control
//! socket. (protect itself needs device-mapper, which hosts do not have:
//! tests/vm/protect.sh runs the whole command.)

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use replctl::protect::{self, ProtectOpts};
use replctl::start::{self, Started};
use replica_tests::*;

/// The material protect's pre-check looks at; the rest of the
/// configuration as protect writes it.
struct Opts {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    keys: PathBuf,
    state_dir: PathBuf,
}

fn opts(env: &Env) -> Opts {
    let pki = env.path("pki");
    Opts {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{SOURCE_CN}.pem")),
        key: pki.join(format!("{SOURCE_CN}.key")),
        keys: env.path("keys.toml"),
        state_dir: env.path("sstate"),
    }
}

/// What `replctl protect --volume pv --target 127.0.0.1:7717` asks for,
/// with `o`'s material.
fn protect_opts(env: &Env, o: &Opts) -> ProtectOpts {
    ProtectOpts {
        device: "/dev/vdb".into(),
        volume: "pv".into(),
        group: None,
        ring_mib: 64,
        target: "127.0.0.1:7717".into(),
        target_name: TARGET_CN.into(),
        ca: o.ca.clone(),
        cert: o.cert.clone(),
        key: o.key.clone(),
        keys: o.keys.clone(),
        config_dir: env.path("etc"),
        state_dir: o.state_dir.clone(),
        initial_copy: true,
        replicad: replicad_bin(),
    }
}

/// The configuration text protect writes for `o`.
fn config_text(env: &Env, o: &Opts) -> String {
    protect::source_config_text(&protect::source_config(
        &protect_opts(env, o),
        "pv",
        1 << 20,
    ))
    .expect("serialise")
}

/// protect's pre-check of the configuration it would write for `o`.
fn check(env: &Env, o: &Opts) -> Result<(), String> {
    protect::check_source(
        &replicad_bin(),
        &env.path("etc/source-pv.toml"),
        &config_text(env, o),
    )
    .map_err(|e| e.to_string())
}

#[test]
fn paths_with_spaces_quotes_and_backslashes_round_trip_into_a_configuration_the_daemon_accepts() {
    let env = Env::new();
    // Every path protect writes, under a directory whose name has a space,
    // both quotes and a backslash.
    let odd = env.path("site a/it's \"dr\"\\x");
    std::fs::create_dir_all(odd.join("pki")).expect("mkdir");
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).expect("copy");
        to.to_owned()
    };
    let plain = opts(&env);
    let o = Opts {
        ca: copy(&plain.ca, &odd.join("pki/ca.pem")),
        cert: copy(&plain.cert, &odd.join("pki/host.pem")),
        key: copy(&plain.key, &odd.join("pki/host.key")),
        keys: copy(&plain.keys, &odd.join("keys \"1\".toml")),
        state_dir: odd.join("state dir"),
    };
    let text = config_text(&env, &o);
    // The daemon's own parser reads back exactly what protect meant.
    let back = replica_config::SourceConfig::from_text(Path::new("source-pv.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let want = protect::source_config(&protect_opts(&env, &o), "pv", 1 << 20);
    assert_eq!(back, want, "{text}");
    assert_eq!(back.keys, o.keys);
    assert_eq!(back.tls.key, o.key);
    assert_eq!(back.state_dir, o.state_dir);
    assert_eq!(back.device.as_deref(), Some(Path::new("/dev/mapper/pv")));
    // And `replicad check source` accepts it: it loads those very files.
    check(&env, &o).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // The check does not create the state directory.
    assert!(!o.state_dir.exists());
}

#[test]
fn protect_refuses_what_the_daemon_cannot_start_with_naming_the_file() {
    let env = Env::new();
    let t0 = Instant::now();
    check(&env, &opts(&env)).expect("complete material passes");

    // The case: a key file that is not there.
    let mut o = opts(&env);
    o.keys = env.path("missing/keys.toml");
    let e = check(&env, &o).expect_err("a missing key file");
    eprintln!("missing key file: {e}");
    assert!(
        e.contains(&format!("key file {}", o.keys.display())) && e.contains("No such file"),
        "{e}"
    );
    assert!(e.starts_with("replicad source cannot start"), "{e}");

    // A key file others can read.
    let loose = env.path("loose-keys.toml");
    std::fs::copy(env.path("keys.toml"), &loose).expect("copy");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut o = opts(&env);
    o.keys = loose.clone();
    let e = check(&env, &o).expect_err("mode 0644");
    assert!(
        e.contains(&loose.display().to_string()) && e.contains("chmod 600"),
        "{e}"
    );

    // A key file that does not parse.
    let bad = env.path("bad-keys.toml");
    std::fs::write(&bad, "active = 1\n").expect("w");
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut o = opts(&env);
    o.keys = bad.clone();
    let e = check(&env, &o).expect_err("unparseable keyring");
    assert!(e.contains(&format!("key file {}", bad.display())), "{e}");

    // Certificates and the private key.
    let mut o = opts(&env);
    o.cert = env.path("pki/nobody.pem");
    let e = check(&env, &o).expect_err("missing certificate");
    assert!(e.contains("certificate") && e.contains("nobody.pem"), "{e}");
    let mut o = opts(&env);
    o.key = env.path("pki/ca.pem");
    let e = check(&env, &o).expect_err("a certificate is no private key");
    assert!(e.contains("private key") && e.contains("ca.pem"), "{e}");

    // A state directory that cannot be created.
    let file = env.path("a-file");
    std::fs::write(&file, "x").expect("w");
    let mut o = opts(&env);
    o.state_dir = file.join("state");
    let e = check(&env, &o).expect_err("state dir under a file");
    assert!(
        e.contains("state directory") && e.contains(&o.state_dir.display().to_string()),
        "{e}"
    );

    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the checks took {:?}",
        t0.elapsed()
    );
    // Nothing was created by checking.
    assert!(!env.path("etc").exists() && !env.path("sstate").exists());
}

/// A source configuration for a ring file (the daemon starts without a
/// kernel module) and the given keyring.
fn ring_config(env: &Env, keys: &Path) -> PathBuf {
    let ring = env.path("ring");
    if !ring.exists() {
        Source::create(&ring, 1 << 20, 64, 256, 1);
    }
    env.source_config(
        "source.toml",
        "pv",
        1 << 20,
        &ring,
        "127.0.0.1:9",
        &env.path("sstate"),
        ("pki", SOURCE_CN),
        keys,
        "",
    )
}

#[test]
fn a_spawned_daemon_that_exits_is_reported_at_once_with_its_log() {
    let env = Env::new();
    // What the pre-check refuses, started anyway (the daemon's view of it).
    let missing = env.path("missing-keys.toml");
    let cfg = ring_config(&env, &missing);
    let sock = replica_control::default_path(&env.path("sstate"));
    let t0 = Instant::now();
    let mut d = start::spawn_source(&replicad_bin(), &cfg, &env.path("sstate")).expect("spawn");
    let e = start::wait_started(&sock, &mut d, Duration::from_secs(60))
        .expect_err("the daemon cannot start")
        .to_string();
    let took = t0.elapsed();
    eprintln!("after {took:?}: {e}");
    assert!(
        took < Duration::from_secs(20),
        "reported after {took:?}, not at once: {e}"
    );
    assert!(e.contains("replicad source exited"), "{e}");
    assert!(e.contains("exit status: 2"), "{e}");
    assert!(
        e.contains(&format!("key file {}", missing.display())),
        "the daemon's own reason is shown: {e}"
    );
    assert!(e.contains("replicad.log"), "{e}");
}

#[test]
fn a_spawned_daemon_that_starts_is_waited_for() {
    let env = Env::new();
    let cfg = ring_config(&env, &env.path("keys.toml"));
    let sock = replica_control::default_path(&env.path("sstate"));
    let mut d = start::spawn_source(&replicad_bin(), &cfg, &env.path("sstate")).expect("spawn");
    let r = start::wait_started(&sock, &mut d, Duration::from_secs(60));
    if let Started::Spawned { child, .. } = &mut d {
        let _ = child.kill();
        let _ = child.wait();
    }
    r.expect("the daemon answers (the target being unreachable does not matter)");
}
