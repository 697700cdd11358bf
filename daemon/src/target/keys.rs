//! The stream keys that open segments, derived once per connection stream,
//! key id and epoch (the receive loop authenticates with them, the applier
//! opens frames read back from the journal with them).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use replica_proto::frame::SegmentHeader;
use replica_proto::keys::{Direction, KeyError, StreamContext, StreamKey};

use crate::keystore::KeyStore;

/// Keys kept before the cache starts over.
const MAX_KEYS: usize = 64;

/// Forward-direction stream keys by (stream id, key id, epoch).
pub(super) struct KeyCache {
    keys: Arc<KeyStore>,
    derived: HashMap<([u8; 16], u32, u64), StreamKey>,
}

impl KeyCache {
    /// An empty cache over the data keys `keys`.
    pub(super) fn new(keys: Arc<KeyStore>) -> Self {
        Self {
            keys,
            derived: HashMap::new(),
        }
    }

    /// The key that opens segment `h` of volume `volume`.
    pub(super) fn get(&mut self, volume: &str, h: &SegmentHeader) -> Result<&StreamKey, KeyError> {
        if self.derived.len() > MAX_KEYS {
            self.derived.clear();
        }
        Ok(match self.derived.entry((h.stream_id, h.key_id, h.epoch)) {
            Entry::Occupied(k) => k.into_mut(),
            Entry::Vacant(v) => {
                let ctx = StreamContext {
                    stream_id: h.stream_id,
                    volume,
                    direction: Direction::Forward,
                    epoch: h.epoch,
                };
                v.insert(StreamKey::derive(&self.keys.get(), h.key_id, &ctx)?)
            }
        })
    }
}
