//! What a daemon answers: the response, its error code, the resync ticket.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::status::VolumeStatus;
use crate::CONTROL_VERSION;

/// A response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub version: u32,
    /// Success.
    pub ok: bool,
    /// Per-volume status (for `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<VolumeStatus>>,
    /// What a command did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why a command was refused or failed, for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What kind of error, for programs (absent from daemons older than
    /// the code: read as [`ErrorCode::Failed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// For `resync` and `initial-copy`: the resync it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncTicket>,
    /// For `point-list`: the ids of the snapshots the replica backend
    /// holds, ascending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<Vec<u64>>,
    /// For `point-open`: the device or file that holds the point (or its
    /// writable copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

impl Response {
    /// Success, with nothing in it yet.
    pub fn ok() -> Self {
        Self {
            version: CONTROL_VERSION,
            ok: true,
            status: None,
            message: None,
            error: None,
            code: None,
            resync: None,
            points: None,
            path: None,
        }
    }

    /// A refusal or failure.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            code: Some(code),
            ..Self::ok()
        }
    }

    /// The error code of an error response (an error without one, from an
    /// older daemon, is [`ErrorCode::Failed`]); `None` for success.
    pub fn error_code(&self) -> Option<ErrorCode> {
        (!self.ok).then(|| self.code.unwrap_or(ErrorCode::Failed))
    }
}

/// Why a daemon did not do what it was asked. Serialised as a stable
/// snake_case string (`"not_found"`); a code this version does not know (a
/// newer daemon's) reads as [`ErrorCode::Failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is not JSON of this protocol.
    MalformedRequest,
    /// The request is of another protocol version.
    UnsupportedVersion,
    /// The caller is neither root nor the daemon's user.
    PermissionDenied,
    /// Not a command of this daemon (of its role, or of this version).
    UnknownCommand,
    /// The volume named is not one of this daemon's.
    NotFound,
    /// The daemon will not do it in its present state.
    Refused,
    /// The command was tried and failed.
    #[serde(other)]
    Failed,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedRequest => "malformed_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::PermissionDenied => "permission_denied",
            Self::UnknownCommand => "unknown_command",
            Self::NotFound => "not_found",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names the resync a `resync` command started: it is done when the
/// source, still on ring generation `generation`, reports a resync END at
/// or after `from_seq` that the target has applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncTicket {
    /// The capture ring generation, hex.
    pub generation: String,
    /// The ring position the request was taken at.
    pub from_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODES: [ErrorCode; 7] = [
        ErrorCode::MalformedRequest,
        ErrorCode::UnsupportedVersion,
        ErrorCode::PermissionDenied,
        ErrorCode::UnknownCommand,
        ErrorCode::NotFound,
        ErrorCode::Refused,
        ErrorCode::Failed,
    ];

    #[test]
    fn error_codes_are_stable_snake_case_strings() {
        for c in CODES {
            let json = serde_json::to_string(&c).expect("json");
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).expect("parse"), c);
        }
        assert_eq!(ErrorCode::NotFound.as_str(), "not_found");
        // A newer daemon's code.
        assert_eq!(
            serde_json::from_str::<ErrorCode>("\"out_of_coffee\"").expect("parse"),
            ErrorCode::Failed
        );
    }

    #[test]
    fn an_error_carries_its_code_and_an_old_daemons_error_reads_as_failed() {
        let r = Response::error(ErrorCode::NotFound, "no volume \"x\" here");
        let json = serde_json::to_string(&r).expect("json");
        assert_eq!(
            json,
            r#"{"version":1,"ok":false,"error":"no volume \"x\" here","code":"not_found"}"#
        );
        let back: Response = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.error_code(), Some(ErrorCode::NotFound));
        let old: Response =
            serde_json::from_str(r#"{"version":1,"ok":false,"error":"nope"}"#).expect("parse");
        assert_eq!(old.error_code(), Some(ErrorCode::Failed));
        assert_eq!(Response::ok().error_code(), None);
    }
}
