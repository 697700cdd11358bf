//! Tables and status lines: a list of targets, each `start length type
//! parameters` — what `dmsetup table` and `dmsetup status` print, one line
//! per target, and what `dmsetup create --table` reads.

use std::fmt;
use std::str::FromStr;

/// One target of a table (or one line of a device's status, whose
/// `params` are then the target's status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector it maps.
    pub start: u64,
    /// Sectors it maps.
    pub length: u64,
    /// Target type (`linear`, `thin-pool`, `replica` ...).
    pub target_type: String,
    /// Its parameters (or status), as the target reads (or writes) them.
    pub params: String,
}

impl Target {
    /// A target mapping `length` sectors from `start`.
    pub fn new(start: u64, length: u64, target_type: &str, params: &str) -> Self {
        Self {
            start,
            length,
            target_type: target_type.to_owned(),
            params: params.to_owned(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.start, self.length, self.target_type)?;
        if !self.params.is_empty() {
            write!(f, " {}", self.params)?;
        }
        Ok(())
    }
}

/// The targets of a device, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// One entry per target.
    pub targets: Vec<Target>,
}

impl From<Target> for Table {
    fn from(t: Target) -> Self {
        Self { targets: vec![t] }
    }
}

impl Table {
    /// The only target, if there is exactly one.
    pub fn single(&self) -> Option<&Target> {
        match self.targets.as_slice() {
            [t] => Some(t),
            _ => None,
        }
    }
}

/// One line per target, no trailing newline (an empty table is "").
impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.targets.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

/// A line of table text that is not `start length type [params]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("table line {line:?}: {what}")]
pub struct TableError {
    /// The line.
    pub line: String,
    /// What is wrong with it.
    pub what: LineFault,
}

/// What is wrong with a table line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineFault {
    /// Start sector missing or not a number.
    #[error("start sector is not a number")]
    Start,
    /// Length missing or not a number.
    #[error("length is not a number")]
    Length,
    /// No target type.
    #[error("no target type")]
    Type,
}

/// Parses table text: one target per line, blank lines ignored; the
/// parameters are the rest of the line after the type, trimmed.
impl FromStr for Table {
    type Err = TableError;

    fn from_str(text: &str) -> Result<Self, TableError> {
        let mut targets = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let fault = |what| TableError {
                line: line.to_owned(),
                what,
            };
            let mut rest = line;
            let mut field = || {
                let s = rest.trim_start();
                let end = s.find(char::is_whitespace).unwrap_or(s.len());
                rest = &s[end..];
                Some(&s[..end]).filter(|f| !f.is_empty())
            };
            let start = field()
                .and_then(|s| s.parse().ok())
                .ok_or(fault(LineFault::Start))?;
            let length = field()
                .and_then(|s| s.parse().ok())
                .ok_or(fault(LineFault::Length))?;
            let target_type = field().ok_or(fault(LineFault::Type))?.to_owned();
            targets.push(Target {
                start,
                length,
                target_type,
                params: rest.trim().to_owned(),
            });
        }
        Ok(Self { targets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_text_round_trips() {
        let text = "0 8 linear 8:0 0\n8 8 replica /dev/vdb v1 group=g  ring_mib=8\n16 4 error";
        let t: Table = text.parse().expect("parse");
        assert_eq!(t.targets.len(), 3);
        assert_eq!(t.targets[1].target_type, "replica");
        assert_eq!(
            t.targets[1].params, "/dev/vdb v1 group=g  ring_mib=8",
            "inner spacing is the target's business"
        );
        assert_eq!(t.targets[2], Target::new(16, 4, "error", ""));
        assert_eq!(t.to_string(), text);
        assert_eq!(t.single(), None);
        let one: Table = "\n  0 8192 thin-pool 254:1 254:2 128 0 0  \n\n"
            .parse()
            .expect("one");
        assert_eq!(
            one.single(),
            Some(&Target::new(0, 8192, "thin-pool", "254:1 254:2 128 0 0"))
        );
        assert_eq!("".parse::<Table>().expect("empty"), Table::default());
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        for (line, what) in [
            ("x 8 linear", LineFault::Start),
            ("0 linear", LineFault::Length),
            ("0 8", LineFault::Type),
        ] {
            assert_eq!(
                line.parse::<Table>(),
                Err(TableError {
                    line: line.into(),
                    what
                })
            );
        }
    }
}
