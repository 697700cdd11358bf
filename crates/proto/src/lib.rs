//! dm-replica's replication stream: segment format, stream keys, messages.

pub mod chunk;
pub mod confirm;
pub mod frame;
pub mod handshake;
pub mod keys;
pub mod le;
pub mod msg;
