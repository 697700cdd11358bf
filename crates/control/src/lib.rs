//! The control protocol of the dm-replica daemons, shared by `replicad`
//! (which serves it) and `replctl` (which asks): the typed request and its
//! [`Command`], the [`Response`] with a stable [`ErrorCode`] on errors, the
//! status a daemon reports ([`status`]), and the client ([`request`],
//! [`send`]).
//!
//! The wire form is one JSON object per line each way on a Unix stream
//! socket:
//!
//! ```text
//! -> {"version":1,"command":"status"}
//! <- {"version":1,"ok":true,"status":[{...per volume...}]}
//! -> {"version":1,"command":"failover","volume":"db1","point":"latest"}
//! <- {"version":1,"ok":false,"code":"not_found","error":"no volume \"db1\" here"}
//! ```
//!
//! A daemon answers a request of another [`CONTROL_VERSION`] with
//! [`ErrorCode::UnsupportedVersion`] and nothing else. Fields a peer does
//! not know are ignored (an optional field a later version adds does not
//! break an older peer); a change an older peer must not ignore bumps the
//! version.

#![warn(missing_docs)]

mod client;
mod request;
mod response;
pub mod status;

pub use client::{default_path, request, request_for, send, ControlError, SOCKET_FILE};
pub use request::{BadPoint, Command, Envelope, PointChoice, Request, CONTROL_VERSION};
pub use response::{ErrorCode, Response, ResyncTicket};
