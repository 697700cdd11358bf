//! What a caller asks: the request and its typed command.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Version of the control protocol.
pub const CONTROL_VERSION: u32 = 1;

/// A request: one command, about one volume or the daemon's only one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version ([`CONTROL_VERSION`]).
    pub version: u32,
    /// The volume the command is about (default: the daemon's only one;
    /// `status` without it reports every volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The command, with its arguments (on the wire: `"command"` and the
    /// arguments' own fields).
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    /// A request of this protocol version about the daemon's only volume.
    pub fn new(command: Command) -> Self {
        Self {
            version: CONTROL_VERSION,
            volume: None,
            command,
        }
    }

    /// The same request about `volume`.
    pub fn for_volume(mut self, volume: Option<&str>) -> Self {
        self.volume = volume.map(str::to_owned);
        self
    }
}

/// The commands of both roles (a daemon refuses those of the other role
/// with [`crate::ErrorCode::UnknownCommand`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Command {
    /// Either role: every volume's status (or the named volume's).
    Status,
    /// Source: a resync of the whole volume: every chunk compared with the
    /// replica's and those that differ sent, or (`full`) every chunk sent.
    Resync {
        /// Send every chunk without comparing.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        full: bool,
    },
    /// Source: online verify: compare every chunk with the replica's
    /// without stopping replication; report those that differ and
    /// (`resync`) send them.
    Verify {
        /// Send the chunks found different.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resync: bool,
        /// Bytes compared per second, at most.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_rate: Option<u64>,
    },
    /// Source: a full copy, unless a resync that reaches the target is
    /// pending or running already.
    InitialCopy,
    /// Source: planned failover (stop writes, ship everything, hand over).
    FailoverPlanned,
    /// Target: unplanned failover (the source is gone).
    Failover {
        /// The state to promote (default: the latest consistent one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        point: Option<PointChoice>,
    },
    /// Source: stop the daemon.
    Stop,
    /// Target: the ids of the snapshots the volume's replica backend holds,
    /// ascending (answered in [`crate::Response::points`]).
    PointList,
    /// Target: make a point readable, or a writable copy of it (answered
    /// with its device or file in [`crate::Response::path`]).
    PointOpen {
        /// The point's id.
        point: u64,
        /// A writable copy of the point instead of the point itself.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        writable: bool,
    },
    /// Target: undo `point-open` (a writable copy is discarded).
    PointClose {
        /// The point's id.
        point: u64,
        /// The point's writable copy.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        writable: bool,
    },
}

impl Command {
    /// One of each command (arguments at their defaults).
    pub const ALL: [Command; 10] = [
        Command::Status,
        Command::Resync { full: false },
        Command::Verify {
            resync: false,
            max_rate: None,
        },
        Command::InitialCopy,
        Command::FailoverPlanned,
        Command::Failover { point: None },
        Command::Stop,
        Command::PointList,
        Command::PointOpen {
            point: 0,
            writable: false,
        },
        Command::PointClose {
            point: 0,
            writable: false,
        },
    ];

    /// The command's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Resync { .. } => "resync",
            Command::Verify { .. } => "verify",
            Command::InitialCopy => "initial-copy",
            Command::FailoverPlanned => "failover-planned",
            Command::Failover { .. } => "failover",
            Command::Stop => "stop",
            Command::PointList => "point-list",
            Command::PointOpen { .. } => "point-open",
            Command::PointClose { .. } => "point-close",
        }
    }

    /// Whether `name` names a command of this protocol version.
    pub fn is_name(name: &str) -> bool {
        Self::ALL.iter().any(|c| c.name() == name)
    }
}

/// What the start of a request says before the rest is understood: a
/// daemon checks the version first, so a peer of another version gets that
/// refusal and not a complaint about a field it does not know.
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    /// Protocol version.
    pub version: u32,
    /// The command's name, if there is one.
    #[serde(default)]
    pub command: Option<String>,
}

/// Which state an unplanned failover promotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PointChoice {
    /// The latest consistent state (`latest`).
    Latest,
    /// The recovery point at this record sequence.
    Seq(u64),
}

/// A point that is neither `latest` nor a record sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("point {0:?}: give `latest` or a recovery point's record sequence")]
pub struct BadPoint(pub String);

impl FromStr for PointChoice {
    type Err = BadPoint;

    fn from_str(s: &str) -> Result<Self, BadPoint> {
        if s == "latest" {
            return Ok(Self::Latest);
        }
        // Digits only: no sign, no spaces.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadPoint(s.to_owned()));
        }
        s.parse().map(Self::Seq).map_err(|_| BadPoint(s.to_owned()))
    }
}

impl TryFrom<String> for PointChoice {
    type Error = BadPoint;

    fn try_from(s: String) -> Result<Self, BadPoint> {
        s.parse()
    }
}

impl From<PointChoice> for String {
    fn from(p: PointChoice) -> Self {
        p.to_string()
    }
}

impl fmt::Display for PointChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latest => f.write_str("latest"),
            Self::Seq(s) => write!(f, "{s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_its_wire_name_and_parses_back() {
        for c in Command::ALL {
            let r = Request::new(c.clone()).for_volume(Some("v"));
            let v: serde_json::Value = serde_json::to_value(&r).expect("json");
            assert_eq!(v["command"], c.name(), "{v}");
            assert_eq!(v["version"], CONTROL_VERSION);
            assert_eq!(v["volume"], "v");
            let back: Request = serde_json::from_value(v).expect("parse");
            assert_eq!(back, r);
            assert!(Command::is_name(c.name()));
        }
        assert!(!Command::is_name("frobnicate"));
    }

    #[test]
    fn the_wire_form_is_the_one_version_1_peers_send() {
        // Exactly what replctl of protocol version 1 sent before the
        // command was typed.
        let r: Request = serde_json::from_str(
            r#"{"version":1,"command":"failover","volume":"db1","point":"1234"}"#,
        )
        .expect("parse");
        assert_eq!(
            r,
            Request {
                version: 1,
                volume: Some("db1".into()),
                command: Command::Failover {
                    point: Some(PointChoice::Seq(1234))
                },
            }
        );
        let r: Request = serde_json::from_str(r#"{"version":1,"command":"status"}"#).expect("p");
        assert_eq!(r, Request::new(Command::Status));
        assert_eq!(
            serde_json::to_string(&Request::new(Command::InitialCopy)).expect("json"),
            r#"{"version":1,"command":"initial-copy"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::new(Command::Failover {
                point: Some(PointChoice::Latest)
            }))
            .expect("json"),
            r#"{"version":1,"command":"failover","point":"latest"}"#
        );
    }

    #[test]
    fn point_commands_name_the_point_and_say_writable_only_when_it_is() {
        assert_eq!(
            serde_json::to_string(
                &Request::new(Command::PointOpen {
                    point: 42,
                    writable: true
                })
                .for_volume(Some("db1"))
            )
            .expect("json"),
            r#"{"version":1,"volume":"db1","command":"point-open","point":42,"writable":true}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::new(Command::PointClose {
                point: 7,
                writable: false
            }))
            .expect("json"),
            r#"{"version":1,"command":"point-close","point":7}"#
        );
        let r: Request =
            serde_json::from_str(r#"{"version":1,"command":"point-open","point":7}"#).expect("p");
        assert_eq!(
            r.command,
            Command::PointOpen {
                point: 7,
                writable: false
            }
        );
        assert!(
            serde_json::from_str::<Request>(r#"{"version":1,"command":"point-open"}"#).is_err(),
            "a point is required"
        );
    }

    #[test]
    fn unknown_commands_and_bad_points_do_not_parse() {
        assert!(serde_json::from_str::<Request>(r#"{"version":1,"command":"frob"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"version":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(
            r#"{"version":1,"command":"failover","point":"soon"}"#
        )
        .is_err());
    }

    #[test]
    fn points_are_latest_or_a_sequence() {
        assert_eq!("latest".parse(), Ok(PointChoice::Latest));
        assert_eq!("42".parse(), Ok(PointChoice::Seq(42)));
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "Latest",
            "1e3",
            "99999999999999999999999",
        ] {
            assert_eq!(
                bad.parse::<PointChoice>(),
                Err(BadPoint(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(PointChoice::Seq(7).to_string(), "7");
    }
}
