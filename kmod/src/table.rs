// SPDX-License-Identifier: GPL-2.0

//! Parsing of the `replica` table line.
//!
//! ```text
//! <start> <sectors> replica <data_dev> <volume_id> [group=<name>] [ring_mib=<N>]
//!                           [region_kib=<N>] [overflow_wait_ms=<N>]
//! ```
//!
//! * `data_dev`: the device holding the data (path or `major:minor`).
//! * `volume_id`: the volume's name in the replication configuration
//!   (1-63 characters of `A-Z a-z 0-9 . _ -`).
//! * `group=`: the consistency group; volumes of one group share one ring,
//!   so every prefix of it is consistent across them. Default: the volume id
//!   (a group of one).
//! * `ring_mib=`: size of the group's data ring in MiB, a power of two from 1
//!   to 4096 (default 64). Fixed when the group's ring is created; a later
//!   table naming another size is refused.
//! * `region_kib=`: granularity of the dirty-region bitmap in KiB, a power of
//!   two from 4 to 1048576 (default 64).
//! * `overflow_wait_ms=`: how long a write may wait for ring space before
//!   capture switches to the dirty bitmap, 0 to 10000 (default 100).
//!
//! Positional arguments come first, in a fixed order; options follow, each
//! at most once. Anything unexpected is an error naming the offending
//! argument in the kernel log, never silently ignored.

use kernel::c_str;
use kernel::str::CStr;

/// Longest volume id or group name, in bytes (the ABI pads to 64 with NULs).
pub(crate) const NAME_MAX: usize = 63;

/// Defaults of the optional settings.
pub(crate) const DEFAULT_RING_MIB: u32 = 64;
pub(crate) const DEFAULT_REGION_KIB: u32 = 64;
pub(crate) const DEFAULT_OVERFLOW_WAIT_MS: u32 = 100;

/// The parsed table arguments.
#[derive(Debug)]
pub(crate) struct TableArgs<'a> {
    /// Path or `major:minor` of the device that holds the data.
    pub(crate) data_dev: &'a CStr,
    /// The volume id.
    pub(crate) volume_id: &'a [u8],
    /// The group name (the volume id if not given).
    pub(crate) group: &'a [u8],
    /// Ring size in MiB, if given.
    pub(crate) ring_mib: Option<u32>,
    /// Dirty-region size in KiB.
    pub(crate) region_kib: u32,
    /// Bounded wait for ring space, in ms.
    pub(crate) overflow_wait_ms: u32,
}

/// Why a table line was rejected, with the argument at fault.
#[derive(Debug)]
pub(crate) enum ArgError<'a> {
    /// A required positional argument is missing.
    Missing(&'static str),
    /// A positional argument is empty.
    Empty(&'static str),
    /// A volume id or group name with a bad length or character.
    BadName(&'static str, &'a CStr),
    /// A `key=value` setting this version does not know.
    UnknownOption(&'a CStr),
    /// The same option twice.
    Duplicate(&'a CStr),
    /// A value that is not a number or out of range.
    BadValue(&'a CStr, &'static str),
    /// More positional arguments than the target takes.
    Unexpected(&'a CStr),
}

impl ArgError<'_> {
    /// The message dm reports as the table load error.
    pub(crate) fn message(&self) -> &'static CStr {
        match self {
            ArgError::Missing(_) => {
                c_str!("Missing argument: expected <data_dev> <volume_id> [options]")
            }
            ArgError::Empty(_) => c_str!("Empty argument"),
            ArgError::BadName(..) => {
                c_str!("Invalid name: 1-63 characters of A-Z a-z 0-9 . _ -")
            }
            ArgError::UnknownOption(_) => c_str!("Unknown option"),
            ArgError::Duplicate(_) => c_str!("Option given twice"),
            ArgError::BadValue(..) => c_str!("Invalid option value"),
            ArgError::Unexpected(_) => {
                c_str!("Too many arguments: expected <data_dev> <volume_id> [options]")
            }
        }
    }
}

impl core::fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ArgError::Missing(name) => write!(f, "missing argument <{name}>"),
            ArgError::Empty(name) => write!(f, "argument <{name}> is empty"),
            ArgError::BadName(what, arg) => write!(
                f,
                "invalid {what} '{arg}': use 1-{NAME_MAX} characters of A-Z a-z 0-9 . _ -"
            ),
            ArgError::UnknownOption(arg) => write!(
                f,
                "unknown option '{arg}' (known: group=, ring_mib=, region_kib=, overflow_wait_ms=)"
            ),
            ArgError::Duplicate(arg) => write!(f, "option '{arg}' given twice"),
            ArgError::BadValue(arg, want) => write!(f, "invalid value in '{arg}': {want}"),
            ArgError::Unexpected(arg) => write!(f, "unexpected argument '{arg}'"),
        }
    }
}

/// Takes the next positional argument, which must be present and non-empty.
fn positional<'a>(
    args: &mut impl Iterator<Item = &'a CStr>,
    name: &'static str,
) -> Result<&'a CStr, ArgError<'a>> {
    let arg = args.next().ok_or(ArgError::Missing(name))?;
    if arg.is_empty() {
        return Err(ArgError::Empty(name));
    }
    Ok(arg)
}

/// Whether `name` is a valid volume id or group name.
pub(crate) fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
}

fn number(value: &[u8]) -> Option<u32> {
    if value.is_empty() || value.len() > 10 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &d in value {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    u32::try_from(n).ok()
}

fn power_of_two_in(value: &[u8], lo: u32, hi: u32) -> Option<u32> {
    number(value).filter(|n| n.is_power_of_two() && (lo..=hi).contains(n))
}

/// Parses the constructor arguments of a `replica` table line.
pub(crate) fn parse<'a>(
    mut args: impl Iterator<Item = &'a CStr>,
) -> Result<TableArgs<'a>, ArgError<'a>> {
    let data_dev = positional(&mut args, "data_dev")?;
    let volume = positional(&mut args, "volume_id")?;
    if !valid_name(volume.as_bytes()) {
        return Err(ArgError::BadName("volume id", volume));
    }
    let mut out = TableArgs {
        data_dev,
        volume_id: volume.as_bytes(),
        group: volume.as_bytes(),
        ring_mib: None,
        region_kib: DEFAULT_REGION_KIB,
        overflow_wait_ms: DEFAULT_OVERFLOW_WAIT_MS,
    };
    let (mut seen_group, mut seen_region, mut seen_wait) = (false, false, false);
    for arg in args {
        let bytes = arg.as_bytes();
        let Some(eq) = bytes.iter().position(|&c| c == b'=') else {
            return Err(ArgError::Unexpected(arg));
        };
        let (key, value) = (&bytes[..eq], &bytes[eq + 1..]);
        match key {
            b"group" => {
                if core::mem::replace(&mut seen_group, true) {
                    return Err(ArgError::Duplicate(arg));
                }
                if !valid_name(value) {
                    return Err(ArgError::BadName("group name", arg));
                }
                out.group = value;
            }
            b"ring_mib" => {
                if out.ring_mib.is_some() {
                    return Err(ArgError::Duplicate(arg));
                }
                out.ring_mib = Some(
                    power_of_two_in(value, 1, 4096)
                        .ok_or(ArgError::BadValue(arg, "a power of two from 1 to 4096"))?,
                );
            }
            b"region_kib" => {
                if core::mem::replace(&mut seen_region, true) {
                    return Err(ArgError::Duplicate(arg));
                }
                out.region_kib = power_of_two_in(value, 4, 1 << 20)
                    .ok_or(ArgError::BadValue(arg, "a power of two from 4 to 1048576"))?;
            }
            b"overflow_wait_ms" => {
                if core::mem::replace(&mut seen_wait, true) {
                    return Err(ArgError::Duplicate(arg));
                }
                out.overflow_wait_ms = number(value)
                    .filter(|&n| n <= 10_000)
                    .ok_or(ArgError::BadValue(arg, "a number from 0 to 10000"))?;
            }
            _ => return Err(ArgError::UnknownOption(arg)),
        }
    }
    Ok(out)
}
