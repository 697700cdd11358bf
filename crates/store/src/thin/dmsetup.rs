//! `dmsetup` as a subprocess: the few device-mapper commands the thin
//! backend, the source's failover and `replctl protect` need, typed, with
//! errors that carry the command, dmsetup's message and the errno it
//! reported.
//!
//! dmsetup runs with `LC_ALL=C` (its messages end with the C library's
//! `strerror` text, which is how the errno is recovered) and no standard
//! input.

use std::ffi::OsString;
use std::process::{Command, Stdio};

use crate::StoreError;

/// Runs dmsetup.
#[derive(Debug, Clone)]
pub struct Dmsetup {
    program: OsString,
}

impl Default for Dmsetup {
    fn default() -> Self {
        Self {
            program: "dmsetup".into(),
        }
    }
}

/// What `dmsetup info` says about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevInfo {
    /// Suspended (I/O is held).
    pub suspended: bool,
    /// Its table is read-only.
    pub read_only: bool,
    /// Openers.
    pub open_count: u32,
    /// Device number.
    pub major: u32,
    /// Device number.
    pub minor: u32,
}

/// `strerror` texts dmsetup prints and the errno they stand for.
const ERRNOS: &[(&str, i32)] = &[
    ("No space left on device", libc::ENOSPC),
    ("File exists", libc::EEXIST),
    ("No data available", libc::ENODATA),
    ("Device or resource busy", libc::EBUSY),
    ("No such device or address", libc::ENXIO),
    ("No such device", libc::ENODEV),
    ("No such file or directory", libc::ENOENT),
    ("Invalid argument", libc::EINVAL),
    ("Input/output error", libc::EIO),
    ("Cannot allocate memory", libc::ENOMEM),
    ("Operation not permitted", libc::EPERM),
];

/// The errno a dmsetup error message ends with, if it is a known one.
pub fn errno_of(message: &str) -> Option<i32> {
    ERRNOS
        .iter()
        .find(|(text, _)| message.contains(text))
        .map(|(_, e)| *e)
}

impl Dmsetup {
    /// Runs `program` instead of `dmsetup` from `PATH`.
    pub fn with_program(program: &std::path::Path) -> Self {
        Self {
            program: program.into(),
        }
    }

    fn run(&self, args: &[&str]) -> Result<String, StoreError> {
        let command = format!("dmsetup {}", args.join(" "));
        let out = Command::new(&self.program)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| StoreError::Dm {
                command: command.clone(),
                message: format!("cannot run dmsetup: {e}"),
                errno: None,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message = match stderr.trim() {
            "" => format!("{} ({})", stdout.trim(), out.status),
            s => s.lines().collect::<Vec<_>>().join("; "),
        };
        Err(StoreError::Dm {
            command,
            errno: errno_of(&message),
            message,
        })
    }

    /// The state of device `name`, `None` if there is none.
    pub fn info(&self, name: &str) -> Result<Option<DevInfo>, StoreError> {
        match self.run(&["info", name]) {
            Ok(out) => Ok(parse_info(&out)),
            Err(StoreError::Dm { message, .. }) if message.contains("does not exist") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The live table of `name`.
    pub fn table(&self, name: &str) -> Result<String, StoreError> {
        self.run(&["table", name]).map(|s| s.trim().to_owned())
    }

    /// The status line of `name`.
    pub fn status(&self, name: &str) -> Result<String, StoreError> {
        self.run(&["status", name]).map(|s| s.trim().to_owned())
    }

    /// Creates device `name` with a one-line `table`.
    pub fn create(&self, name: &str, table: &str, read_only: bool) -> Result<(), StoreError> {
        let mut args = vec!["create", name];
        if read_only {
            args.push("--readonly");
        }
        args.extend(["--table", table]);
        self.run(&args).map(drop)
    }

    /// Loads `table` as the inactive table of device `name` (the next
    /// resume swaps it in).
    pub fn reload(&self, name: &str, table: &str) -> Result<(), StoreError> {
        self.run(&["reload", name, "--table", table]).map(drop)
    }

    /// Removes device `name`.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        self.run(&["remove", name]).map(drop)
    }

    /// Suspends device `name` (outstanding I/O completes first).
    pub fn suspend(&self, name: &str) -> Result<(), StoreError> {
        self.run(&["suspend", name]).map(drop)
    }

    /// Resumes device `name`.
    pub fn resume(&self, name: &str) -> Result<(), StoreError> {
        self.run(&["resume", name]).map(drop)
    }

    /// Sends `message` to sector 0 of device `name`.
    pub fn message(&self, name: &str, message: &str) -> Result<(), StoreError> {
        self.run(&["message", name, "0", message]).map(drop)
    }

    /// Sends `message` to sector 0 of device `name` and returns the
    /// target's reply.
    pub fn message_reply(&self, name: &str, message: &str) -> Result<String, StoreError> {
        self.run(&["message", name, "0", message])
            .map(|s| s.trim().to_owned())
    }
}

/// Parses `dmsetup info` output.
pub fn parse_info(out: &str) -> Option<DevInfo> {
    let mut info = DevInfo {
        suspended: false,
        read_only: false,
        open_count: 0,
        major: 0,
        minor: 0,
    };
    let mut seen_state = false;
    for line in out.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "State" => {
                seen_state = true;
                info.suspended = value.starts_with("SUSPENDED");
                info.read_only = value.contains("READ-ONLY");
            }
            "Open count" => info.open_count = value.parse().ok()?,
            "Major, minor" => {
                let (a, b) = value.split_once(',')?;
                info.major = a.trim().parse().ok()?;
                info.minor = b.trim().parse().ok()?;
            }
            _ => {}
        }
    }
    seen_state.then_some(info)
}

/// A thin pool's table: `0 <len> thin-pool <metadata dev> <data dev>
/// <sectors per block> <low water blocks> <#features> <features...>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTable {
    /// Pool block size in 512-byte sectors.
    pub block_sectors: u64,
    /// Feature arguments (`error_if_no_space`, `skip_block_zeroing` ...).
    pub features: Vec<String>,
}

/// Parses a thin pool's table (one line, one target).
pub fn parse_pool_table(table: &str) -> Result<PoolTable, String> {
    let lines: Vec<&str> = table.lines().filter(|l| !l.trim().is_empty()).collect();
    let [line] = lines.as_slice() else {
        return Err(format!(
            "expected one thin-pool target, got {} lines",
            lines.len()
        ));
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(2) != Some(&"thin-pool") {
        return Err(format!("not a thin-pool target: {line:?}"));
    }
    let num = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("field {i} of {line:?}"))
    };
    let block_sectors = num(5)?;
    let n = num(7)? as usize;
    let features: Vec<String> = f.iter().skip(8).map(|s| (*s).to_owned()).collect();
    if features.len() != n {
        return Err(format!(
            "{line:?}: {n} features announced, {} present",
            features.len()
        ));
    }
    Ok(PoolTable {
        block_sectors,
        features,
    })
}

/// Mode of a thin pool, from its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// Writable.
    ReadWrite,
    /// Read-only (metadata trouble: writes fail).
    ReadOnly,
    /// Out of data space (with `error_if_no_space`, writes that need new
    /// blocks fail with ENOSPC until the pool grows).
    OutOfDataSpace,
    /// Failed: every I/O errors.
    Fail,
}

/// A thin pool's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// Metadata blocks used.
    pub meta_used: u64,
    /// Metadata blocks in all.
    pub meta_total: u64,
    /// Data blocks used.
    pub data_used: u64,
    /// Data blocks in all.
    pub data_total: u64,
    /// Mode.
    pub mode: PoolMode,
    /// Errors instead of queueing when full.
    pub error_if_no_space: bool,
    /// The metadata needs `thin_check`.
    pub needs_check: bool,
}

/// Parses a thin pool's status line: `0 <len> thin-pool <transaction id>
/// <used>/<total metadata blocks> <used>/<total data blocks> <held root>
/// rw|ro|out_of_data_space <discard mode> error_if_no_space|queue_if_no_space
/// needs_check|- <metadata low water>`, or `... thin-pool Fail`.
pub fn parse_pool_status(status: &str) -> Result<PoolStatus, String> {
    let f: Vec<&str> = status.split_whitespace().collect();
    if f.get(2) != Some(&"thin-pool") {
        return Err(format!("not a thin-pool status: {status:?}"));
    }
    if matches!(f.get(3), Some(&"Fail") | Some(&"Error")) {
        return Ok(PoolStatus {
            meta_used: 0,
            meta_total: 0,
            data_used: 0,
            data_total: 0,
            mode: PoolMode::Fail,
            error_if_no_space: false,
            needs_check: false,
        });
    }
    let frac = |i: usize| -> Result<(u64, u64), String> {
        let s = f
            .get(i)
            .ok_or_else(|| format!("field {i} missing in {status:?}"))?;
        let (a, b) = s
            .split_once('/')
            .ok_or_else(|| format!("field {i} of {status:?}"))?;
        Ok((
            a.parse().map_err(|_| format!("field {i} of {status:?}"))?,
            b.parse().map_err(|_| format!("field {i} of {status:?}"))?,
        ))
    };
    let (meta_used, meta_total) = frac(4)?;
    let (data_used, data_total) = frac(5)?;
    let mode = match f.get(7) {
        Some(&"rw") => PoolMode::ReadWrite,
        Some(&"ro") => PoolMode::ReadOnly,
        Some(&"out_of_data_space") => PoolMode::OutOfDataSpace,
        other => return Err(format!("unknown pool mode {other:?} in {status:?}")),
    };
    let rest = &f[8..];
    Ok(PoolStatus {
        meta_used,
        meta_total,
        data_used,
        data_total,
        mode,
        error_if_no_space: rest.contains(&"error_if_no_space"),
        needs_check: rest.contains(&"needs_check"),
    })
}

/// A thin device's table: `0 <len> thin <pool dev> <device id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinTable {
    /// Length in sectors.
    pub sectors: u64,
    /// The pool, `major:minor`.
    pub pool: String,
    /// Thin device id.
    pub device_id: u32,
}

/// Parses a thin device's table (one line, one target, no external origin).
pub fn parse_thin_table(table: &str) -> Result<ThinTable, String> {
    let lines: Vec<&str> = table.lines().filter(|l| !l.trim().is_empty()).collect();
    let [line] = lines.as_slice() else {
        return Err(format!(
            "expected one thin target, got {} lines",
            lines.len()
        ));
    };
    match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["0", len, "thin", pool, id] => Ok(ThinTable {
            sectors: len.parse().map_err(|_| format!("length in {line:?}"))?,
            pool: (*pool).to_owned(),
            device_id: id.parse().map_err(|_| format!("device id in {line:?}"))?,
        }),
        _ => Err(format!("not a plain thin target: {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_status_lines_parse() {
        let s = parse_pool_status(
            "0 262144 thin-pool 3 12/1024 1900/2048 - rw discard_passdown error_if_no_space - 768",
        )
        .expect("parse");
        assert_eq!(
            s,
            PoolStatus {
                meta_used: 12,
                meta_total: 1024,
                data_used: 1900,
                data_total: 2048,
                mode: PoolMode::ReadWrite,
                error_if_no_space: true,
                needs_check: false,
            }
        );
        let s = parse_pool_status(
            "0 8192 thin-pool 9 20/1024 64/64 - out_of_data_space discard_passdown queue_if_no_space needs_check 768",
        )
        .expect("parse");
        assert_eq!(s.mode, PoolMode::OutOfDataSpace);
        assert!(!s.error_if_no_space);
        assert!(s.needs_check);
        assert_eq!(
            parse_pool_status("0 8192 thin-pool Fail")
                .expect("fail")
                .mode,
            PoolMode::Fail
        );
        assert_eq!(
            parse_pool_status("0 8 thin-pool 1 1/2 3/4 - ro ignore_discard error_if_no_space - 1")
                .expect("ro")
                .mode,
            PoolMode::ReadOnly
        );
        assert!(parse_pool_status("0 8192 linear").is_err());
        assert!(parse_pool_status("0 8192 thin-pool 1 x/2 3/4 - rw").is_err());
        assert!(parse_pool_status("0 8192 thin-pool 1 1/2 3/4 - what").is_err());
    }

    #[test]
    fn pool_tables_parse() {
        let t = parse_pool_table("0 262144 thin-pool 254:1 254:2 128 0 1 error_if_no_space\n")
            .expect("parse");
        assert_eq!(t.block_sectors, 128);
        assert_eq!(t.features, vec!["error_if_no_space".to_owned()]);
        let t = parse_pool_table("0 262144 thin-pool 254:1 254:2 128 0 0").expect("parse");
        assert!(t.features.is_empty());
        assert!(
            parse_pool_table("0 262144 thin-pool 254:1 254:2 128 0 2 skip_block_zeroing").is_err()
        );
        assert!(parse_pool_table("0 10 linear 8:0 0").is_err());
        assert!(parse_pool_table(
            "0 10 thin-pool 1:1 1:2 128 0 0\n10 10 thin-pool 1:1 1:2 128 0 0"
        )
        .is_err());
    }

    #[test]
    fn thin_tables_parse() {
        assert_eq!(
            parse_thin_table("0 65536 thin 254:3 7\n").expect("parse"),
            ThinTable {
                sectors: 65536,
                pool: "254:3".into(),
                device_id: 7
            }
        );
        assert!(
            parse_thin_table("0 65536 thin 254:3 7 8:16").is_err(),
            "external origin"
        );
        assert!(parse_thin_table("0 65536 linear 8:0 0").is_err());
    }

    #[test]
    fn info_parses_and_errnos_are_recognised() {
        let out = "Name:              r0\nState:             SUSPENDED\nRead Ahead:        256\n\
                   Tables present:    LIVE\nOpen count:        2\nEvent number:      0\n\
                   Major, minor:      254, 3\nNumber of targets: 1\n";
        assert_eq!(
            parse_info(out),
            Some(DevInfo {
                suspended: true,
                read_only: false,
                open_count: 2,
                major: 254,
                minor: 3
            })
        );
        let ro = parse_info(
            "State:             ACTIVE (READ-ONLY)\nOpen count: 0\nMajor, minor: 254, 9\n",
        )
        .expect("parse");
        assert!(ro.read_only && !ro.suspended);
        assert_eq!(parse_info("Device does not exist.\n"), None);
        assert_eq!(
            errno_of("device-mapper: message ioctl on pool  failed: File exists"),
            Some(libc::EEXIST)
        );
        assert_eq!(
            errno_of("device-mapper: message ioctl on pool  failed: No data available"),
            Some(libc::ENODATA)
        );
        assert_eq!(errno_of("something else"), None);
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let d = Dmsetup {
            program: "/nonexistent/dmsetup".into(),
        };
        let e = d.status("x").expect_err("must fail").to_string();
        assert!(
            e.contains("dmsetup status x") && e.contains("cannot run dmsetup"),
            "{e}"
        );
    }
}
