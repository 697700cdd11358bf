//! Coverage-guided fuzzing of the dm-replica parsers: everything that reads
//! bytes another party wrote (the peer, the disk, the kernel, the
//! administrator).
//!
//! | target | reads | from |
//! |---|---|---|
//! | `frame` | segment headers and frames: decode, keyless check, open with a fixed key (authenticate, decompress, decode records); sealing round trips | the network, the journal |
//! | `message` | replication messages, whole and cut short | the network |
//! | `handshake` | the opening's state machines (`replica_proto::handshake`): a peer's messages to either role; no key confirmation accepted without the key; an honest opening accepted, and refused with one byte of the hello, the tag, the session or the key changed; nothing acted on before the target's tag verifies | the network |
//! | `spool` | the source's spool files: start-up scan and repair, reader, acknowledgement, append after repair | the disk |
//! | `journal` | the target's journal files and durable watermark: open, repair, refusal, append after repair | the disk |
//! | `config` | `source.toml`, `target.toml`, the keyring file; what parses is written back and parses equal | the administrator |
//! | `cursor` | the source's resync cursor (`resync.state`), as any file and as what a holder of the key could seal: refused, or a state within its volume that encodes back to the same bytes | the disk |
//! | `ring_abi` | the ring ABI's index rules, the kernel module's producer logic under arbitrary release requests, its dirty bitmaps, and the userspace consumer over ring memory a producer wrote | the kernel/user boundary |
//!
//! Each target is a function here (`<module>::run`) that takes the fuzz
//! input, plus a thin `fuzz_targets/<target>.rs` binary around it. A
//! target never only looks for panics: it checks what its parser promises
//! (an error and no change on disk, or a consistent value that survives a
//! round trip; see each module). A panic, an abort or an allocation above
//! the target's bound ([`alloc::Bounded`]) is a crash; libFuzzer saves
//! the input.
//!
//! # Build: cargo-fuzz on the stable toolchain
//!
//! The targets are libFuzzer binaries (`libfuzzer-sys`) built by
//! `cargo fuzz` with `--sanitizer none`. With no sanitizer, every flag
//! cargo-fuzz passes is a stable one: `-Cpasses=sancov-module` and the
//! `-Cllvm-args=-sanitizer-coverage-*` options (inline 8-bit counters,
//! PC table, trace-compares, stack depth), `--cfg fuzzing`, release
//! optimisation with `-Cdebug-assertions` (overflow checks on, as the
//! kernel module builds its Rust). The toolchain is the repository's
//! `stable` (`rust-toolchain.toml`); nothing needs nightly, `-Z` flags or
//! `RUSTC_BOOTSTRAP`. What a sanitizer would add is not available on
//! stable: AddressSanitizer's checks of `unsafe` code (the ring mapping is
//! the only such code reached, and it is bounds-checked by construction)
//! and libFuzzer's `-malloc_limit_mb` (replaced by [`alloc::Bounded`]).
//! cargo-afl was the alternative; libFuzzer runs in process, needs no
//! `afl-fuzz` driver and takes the corpus and dictionary layout
//! `scripts/fuzz.sh` uses.
//!
//! # Running
//!
//! `scripts/fuzz.sh [--time SECS] [target...]` builds the targets, runs
//! each for SECS seconds (default 30) on one core and prints a table;
//! corpora live outside the repository, in
//! `${XDG_CACHE_HOME:-$HOME/.cache}/dm-replica/fuzz/<target>`. By hand:
//!
//! ```text
//! cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none frame CORPUS tests/fuzz/seeds/frame
//! ```
//!
//! # Seeds
//!
//! `seeds/<target>/` holds a small corpus made from real encodings (frames
//! sealed with the fixed key of [`keys`], spools and journals written by
//! their own writers, configurations the parsers accept). It is generated
//! by each module's `seeds()`; `cargo test` in this directory checks it is
//! current (`UPDATE_SEEDS=1 cargo test` rewrites it) and runs every seed
//! through its target. `dicts/<target>.dict` are libFuzzer dictionaries.
//!
//! # Adding a target
//!
//! A module with `run`, `seeds` and `ALLOC_LIMIT`, a `[[bin]]` in
//! `Cargo.toml`, a line in [`TARGETS`].

pub mod alloc;
pub mod config;
pub mod cursor;
pub mod frame;
pub mod handshake;
pub mod input;
pub mod journal;
pub mod keys;
pub mod message;
pub mod ring;
pub mod spool;

// The kernel module's capture logic, built from the module's own source
// (as `crates/capture` does): it names the ABI as `crate::ring_abi`. Left
// to the module's formatting.
pub(crate) use ::ring_abi;
#[path = "../../../kmod/src/capture.rs"]
#[allow(dead_code, unreachable_pub)]
#[rustfmt::skip]
pub(crate) mod capture;

/// A target: its name, its function, its seed corpus.
pub type Target = (&'static str, fn(&[u8]), fn() -> Vec<(String, Vec<u8>)>);

/// Every target.
pub const TARGETS: &[Target] = &[
    ("frame", frame::run, frame::seeds),
    ("message", message::run, message::seeds),
    ("handshake", handshake::run, handshake::seeds),
    ("spool", spool::run, spool::seeds),
    ("journal", journal::run, journal::seeds),
    ("config", config::run, config::seeds),
    ("ring_abi", ring::run, ring::seeds),
    ("cursor", cursor::run, cursor::seeds),
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use super::TARGETS;

    fn seed_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(target)
    }

    fn committed(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd {
                let e = e.expect("list seeds");
                let bytes = std::fs::read(e.path()).expect("read a seed");
                m.insert(e.file_name().to_string_lossy().into_owned(), bytes);
            }
        }
        m
    }

    /// The committed seeds are what the modules generate now
    /// (`UPDATE_SEEDS=1` rewrites them).
    #[test]
    fn seed_corpus_is_current() {
        let update = std::env::var_os("UPDATE_SEEDS").is_some();
        for (name, _, seeds) in TARGETS {
            let dir = seed_dir(name);
            let want: BTreeMap<String, Vec<u8>> = seeds().into_iter().collect();
            if update {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).expect("create the seed directory");
                for (file, bytes) in &want {
                    std::fs::write(dir.join(file), bytes).expect("write a seed");
                }
            }
            let have = committed(&dir);
            assert_eq!(
                have.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{name}: seed files differ (UPDATE_SEEDS=1 cargo test rewrites them)"
            );
            for (file, bytes) in &want {
                assert!(
                    have[file] == *bytes,
                    "{name}/{file} is stale (UPDATE_SEEDS=1 cargo test rewrites it)"
                );
            }
        }
    }

    /// Every seed runs through its target without a finding, and so does
    /// every prefix of it (the short inputs the fuzzer starts from).
    #[test]
    fn every_seed_runs_clean() {
        for (name, run, seeds) in TARGETS {
            for (file, bytes) in seeds() {
                run(&bytes);
                for cut in [
                    0,
                    1,
                    bytes.len() / 3,
                    bytes.len() / 2,
                    bytes.len().saturating_sub(1),
                ] {
                    run(&bytes[..cut.min(bytes.len())]);
                }
                let _ = (name, file);
            }
        }
    }
}
