// SPDX-License-Identifier: GPL-2.0

//! Parsing of the `replica` table line.
//!
//! ```text
//! <start> <sectors> replica <data_dev>
//! ```
//!
//! Positional arguments come first, in a fixed order; optional `key=value`
//! settings may follow. Anything unexpected is an error that names the
//! offending argument in the kernel log, never silently ignored.

use kernel::c_str;
use kernel::str::CStr;

/// The parsed table arguments.
#[derive(Debug)]
pub(crate) struct TableArgs<'a> {
    /// Path or `major:minor` of the device that holds the data.
    pub(crate) data_dev: &'a CStr,
}

/// Why a table line was rejected, with the argument at fault.
#[derive(Debug)]
pub(crate) enum ArgError<'a> {
    /// A required positional argument is missing.
    Missing(&'static str),
    /// A positional argument is empty.
    Empty(&'static str),
    /// A `key=value` setting this version does not know.
    UnknownOption(&'a CStr),
    /// More positional arguments than the target takes.
    Unexpected(&'a CStr),
}

impl ArgError<'_> {
    /// The message dm reports as the table load error.
    pub(crate) fn message(&self) -> &'static CStr {
        match self {
            ArgError::Missing(_) => c_str!("Missing argument: expected <data_dev>"),
            ArgError::Empty(_) => c_str!("Empty argument"),
            ArgError::UnknownOption(_) => c_str!("Unknown option"),
            ArgError::Unexpected(_) => c_str!("Too many arguments: expected <data_dev>"),
        }
    }
}

impl core::fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ArgError::Missing(name) => write!(f, "missing argument <{name}>"),
            ArgError::Empty(name) => write!(f, "argument <{name}> is empty"),
            ArgError::UnknownOption(arg) => write!(f, "unknown option '{arg}'"),
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

/// Parses the constructor arguments of a `replica` table line.
pub(crate) fn parse<'a>(
    mut args: impl Iterator<Item = &'a CStr>,
) -> Result<TableArgs<'a>, ArgError<'a>> {
    let data_dev = positional(&mut args, "data_dev")?;
    // Optional settings: none are defined yet, so any `key=value` is unknown
    // and any other word is one argument too many.
    if let Some(arg) = args.next() {
        return Err(if arg.as_bytes().contains(&b'=') {
            ArgError::UnknownOption(arg)
        } else {
            ArgError::Unexpected(arg)
        });
    }
    Ok(TableArgs { data_dev })
}
