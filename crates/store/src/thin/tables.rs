//! What the thin backend reads from device-mapper tables and status: a thin
//! pool's table and status, a thin device's table.

use replica_dm::{Table, Target};

/// A table or status that is not what the thin backend expects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Not exactly one target.
    #[error("expected one {want} target, got {got}")]
    Targets {
        /// The target type expected.
        want: &'static str,
        /// How many there are.
        got: usize,
    },
    /// A target of another type.
    #[error("not a {want} target: {line:?}")]
    Type {
        /// The target type expected.
        want: &'static str,
        /// The line.
        line: String,
    },
    /// A field missing or not what it should be.
    #[error("field {field} of {line:?}")]
    Field {
        /// Which (0 is the first parameter).
        field: usize,
        /// The line.
        line: String,
    },
    /// A feature count that does not match the features.
    #[error("{line:?}: {announced} features announced, {present} present")]
    Features {
        /// The count in the table.
        announced: usize,
        /// The features there are.
        present: usize,
        /// The line.
        line: String,
    },
    /// A pool mode this does not know.
    #[error("unknown pool mode {mode:?} in {line:?}")]
    Mode {
        /// The mode field.
        mode: Option<String>,
        /// The line.
        line: String,
    },
    /// A thin target with more than a pool and an id (an external origin).
    #[error("not a plain thin target: {line:?}")]
    NotPlain {
        /// The line.
        line: String,
    },
}

/// The one target of `table`, of type `want`.
fn single<'a>(table: &'a Table, want: &'static str) -> Result<&'a Target, LayoutError> {
    let t = table.single().ok_or(LayoutError::Targets {
        want,
        got: table.targets.len(),
    })?;
    if t.target_type != want {
        return Err(LayoutError::Type {
            want,
            line: t.to_string(),
        });
    }
    Ok(t)
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

/// Parses a thin pool's table (one target).
pub fn parse_pool_table(table: &Table) -> Result<PoolTable, LayoutError> {
    let t = single(table, "thin-pool")?;
    let f: Vec<&str> = t.params.split_whitespace().collect();
    let num = |i: usize| -> Result<u64, LayoutError> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| LayoutError::Field {
                field: i,
                line: t.to_string(),
            })
    };
    let block_sectors = num(2)?;
    let n = num(4)? as usize;
    let features: Vec<String> = f.iter().skip(5).map(|s| (*s).to_owned()).collect();
    if features.len() != n {
        return Err(LayoutError::Features {
            announced: n,
            present: features.len(),
            line: t.to_string(),
        });
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

/// Parses a thin pool's status: `0 <len> thin-pool <transaction id>
/// <used>/<total metadata blocks> <used>/<total data blocks> <held root>
/// rw|ro|out_of_data_space <discard mode> error_if_no_space|queue_if_no_space
/// needs_check|- <metadata low water>`, or `... thin-pool Fail`.
pub fn parse_pool_status(status: &Table) -> Result<PoolStatus, LayoutError> {
    let t = single(status, "thin-pool")?;
    let f: Vec<&str> = t.params.split_whitespace().collect();
    if matches!(f.first(), Some(&"Fail") | Some(&"Error")) {
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
    let frac = |i: usize| -> Result<(u64, u64), LayoutError> {
        let bad = || LayoutError::Field {
            field: i,
            line: t.to_string(),
        };
        let (a, b) = f.get(i).and_then(|s| s.split_once('/')).ok_or_else(bad)?;
        Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
    };
    let (meta_used, meta_total) = frac(1)?;
    let (data_used, data_total) = frac(2)?;
    let mode = match f.get(4) {
        Some(&"rw") => PoolMode::ReadWrite,
        Some(&"ro") => PoolMode::ReadOnly,
        Some(&"out_of_data_space") => PoolMode::OutOfDataSpace,
        other => {
            return Err(LayoutError::Mode {
                mode: other.map(|s| (*s).to_owned()),
                line: t.to_string(),
            })
        }
    };
    let rest = &f[5..];
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

/// Parses a thin device's status, `0 <len> thin <mapped sectors> <highest
/// mapped sector>|-` (or `Fail`): the first byte after its highest
/// provisioned block (0 when nothing is provisioned; every byte from
/// there on reads as zeros), or `None` for a failed device (nothing is
/// known).
pub fn parse_thin_status(status: &Table) -> Result<Option<u64>, LayoutError> {
    let t = single(status, "thin")?;
    let f: Vec<&str> = t.params.split_whitespace().collect();
    let bad = |field: usize| LayoutError::Field {
        field,
        line: t.to_string(),
    };
    match f.as_slice() {
        [one] if *one == "Fail" || *one == "Error" => Ok(None),
        [mapped, highest] => {
            mapped.parse::<u64>().map_err(|_| bad(0))?;
            if *highest == "-" {
                return Ok(Some(0));
            }
            let h: u64 = highest.parse().map_err(|_| bad(1))?;
            Ok(Some(
                h.checked_add(1)
                    .and_then(|s| s.checked_mul(512))
                    .ok_or_else(|| bad(1))?,
            ))
        }
        _ => Err(bad(0)),
    }
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

/// Parses a thin device's table (one target from sector 0, no external
/// origin).
pub fn parse_thin_table(table: &Table) -> Result<ThinTable, LayoutError> {
    let t = single(table, "thin")?;
    let not_plain = || LayoutError::NotPlain {
        line: t.to_string(),
    };
    match t.params.split_whitespace().collect::<Vec<_>>().as_slice() {
        [pool, id] if t.start == 0 => Ok(ThinTable {
            sectors: t.length,
            pool: (*pool).to_owned(),
            device_id: id.parse().map_err(|_| LayoutError::Field {
                field: 1,
                line: t.to_string(),
            })?,
        }),
        _ => Err(not_plain()),
    }
}

/// The table of thin device `id` of `pool` (a device path or
/// `major:minor`), `sectors` long.
pub fn thin_table(pool: &str, sectors: u64, id: u32) -> Table {
    Target::new(0, sectors, "thin", &format!("{pool} {id}")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> Table {
        text.parse().expect("table text")
    }

    #[test]
    fn pool_status_lines_parse() {
        let s = parse_pool_status(&t(
            "0 262144 thin-pool 3 12/1024 1900/2048 - rw discard_passdown error_if_no_space - 768",
        ))
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
        let s = parse_pool_status(&t(
            "0 8192 thin-pool 9 20/1024 64/64 - out_of_data_space discard_passdown queue_if_no_space needs_check 768",
        ))
        .expect("parse");
        assert_eq!(s.mode, PoolMode::OutOfDataSpace);
        assert!(!s.error_if_no_space);
        assert!(s.needs_check);
        assert_eq!(
            parse_pool_status(&t("0 8192 thin-pool Fail"))
                .expect("fail")
                .mode,
            PoolMode::Fail
        );
        assert_eq!(
            parse_pool_status(&t(
                "0 8 thin-pool 1 1/2 3/4 - ro ignore_discard error_if_no_space - 1"
            ))
            .expect("ro")
            .mode,
            PoolMode::ReadOnly
        );
        assert!(parse_pool_status(&t("0 8192 linear")).is_err());
        assert!(parse_pool_status(&t("0 8192 thin-pool 1 x/2 3/4 - rw")).is_err());
        assert!(parse_pool_status(&t("0 8192 thin-pool 1 1/2 3/4 - what")).is_err());
    }

    #[test]
    fn pool_tables_parse() {
        let p = parse_pool_table(&t(
            "0 262144 thin-pool 254:1 254:2 128 0 1 error_if_no_space\n",
        ))
        .expect("parse");
        assert_eq!(p.block_sectors, 128);
        assert_eq!(p.features, vec!["error_if_no_space".to_owned()]);
        let p = parse_pool_table(&t("0 262144 thin-pool 254:1 254:2 128 0 0")).expect("parse");
        assert!(p.features.is_empty());
        assert!(parse_pool_table(&t(
            "0 262144 thin-pool 254:1 254:2 128 0 2 skip_block_zeroing"
        ))
        .is_err());
        assert!(parse_pool_table(&t("0 10 linear 8:0 0")).is_err());
        assert!(parse_pool_table(&t(
            "0 10 thin-pool 1:1 1:2 128 0 0\n10 10 thin-pool 1:1 1:2 128 0 0"
        ))
        .is_err());
    }

    #[test]
    fn thin_status_gives_the_end_of_the_highest_provisioned_block() {
        assert_eq!(
            parse_thin_status(&t("0 65536 thin 0 -\n")).expect("parse"),
            Some(0)
        );
        // Block of 128 sectors: highest mapped block 3 ends at sector 511.
        assert_eq!(
            parse_thin_status(&t("0 65536 thin 256 511\n")).expect("parse"),
            Some(512 * 512)
        );
        assert_eq!(
            parse_thin_status(&t("0 65536 thin Fail\n")).expect("parse"),
            None
        );
        for bad in [
            "0 65536 thin 256\n",
            "0 65536 thin x 511\n",
            "0 65536 thin 256 y\n",
            "0 65536 thin 1 18446744073709551615\n",
            "0 65536 thin-pool 1 2\n",
        ] {
            assert!(parse_thin_status(&t(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn thin_tables_parse() {
        assert_eq!(
            parse_thin_table(&t("0 65536 thin 254:3 7\n")).expect("parse"),
            ThinTable {
                sectors: 65536,
                pool: "254:3".into(),
                device_id: 7
            }
        );
        assert!(
            parse_thin_table(&t("0 65536 thin 254:3 7 8:16")).is_err(),
            "external origin"
        );
        assert!(parse_thin_table(&t("0 65536 linear 8:0 0")).is_err());
        assert!(parse_thin_table(&t("8 65536 thin 254:3 7")).is_err());
        assert_eq!(
            parse_thin_table(&thin_table("/dev/mapper/pool", 2048, 9)).expect("ours"),
            ThinTable {
                sectors: 2048,
                pool: "/dev/mapper/pool".into(),
                device_id: 9
            }
        );
    }
}
