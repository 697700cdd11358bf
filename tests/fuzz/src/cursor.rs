//! `cursor`: the source's resync cursor (`resync.state`,
//! `replicad::source::dirty::ResyncState`) read back from arbitrary bytes.
//!
//! The first input byte chooses who wrote the rest:
//! * low bit clear: anyone (a damaged or edited file): it is refused, or it
//!   is the encoding of a state (it then encodes back to exactly these
//!   bytes);
//! * low bit set: a holder of the key (the fixed key ring of [`crate::keys`]):
//!   the rest is a body that gets the key id and MAC appended, so the
//!   checks behind the MAC see the content. Whatever the body says (a
//!   volume of 16 EiB, bits past its end, a reason that is not UTF-8), the
//!   decoder refuses it or returns a state whose bitmaps are within the
//!   volume, count what they hold, and encode back to exactly the input.
//!
//! Nothing is allocated by a size the input names before that size was
//! checked against the input's length ([`ALLOC_LIMIT`]).

use replica_proto::keys::KeyRing;
use replicad::source::dirty::{CursorKeys, ResyncState};

use crate::input::Reader;

/// Largest allocation the target may make: the bitmaps are as long as the
/// input says they are, and inputs are a few KiB.
pub const ALLOC_LIMIT: usize = 1 << 20;

/// The volume the cursor is read for.
const VOLUME: &str = crate::keys::VOLUME;

fn ring() -> &'static KeyRing {
    static RING: std::sync::OnceLock<KeyRing> = std::sync::OnceLock::new();
    RING.get_or_init(|| KeyRing::parse(crate::keys::KEYRING).expect("the fixed keyring parses"))
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let key_holder = r.u8() & 1 != 0;
    let keys = CursorKeys {
        ring: ring(),
        volume: VOLUME,
    };
    let bytes = if key_holder {
        keys.seal(r.rest().to_vec())
    } else {
        r.rest().to_vec()
    };
    let Ok(st) = ResyncState::decode(&bytes, &keys) else {
        return;
    };
    for m in [&st.map, &st.differ] {
        // Counted over the volume's regions only: a bit set past the end
        // (one no resync could clear) would make them differ.
        assert_eq!(
            m.iter().count() as u64,
            m.count(),
            "a region set past the end"
        );
    }
    assert_eq!(
        st.encode(&keys),
        bytes,
        "a decoded cursor encodes back to its bytes"
    );
}

/// Seed inputs: real cursors, as files and as key holders' bodies.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use replicad::source::dirty::DirtyMap;
    let keys = CursorKeys {
        ring: ring(),
        volume: VOLUME,
    };
    let mut out = Vec::new();
    let mut map = DirtyMap::new(100 * 65536 + 512, 65536);
    map.mark(3 * 65536, 200_000);
    let mut st = ResyncState::new([4; 16], 77, "spool limit".into(), map);
    st.begin_seq = Some(80);
    st.differ.set_region(4);
    let mut full = ResyncState::new([5; 16], 1, "initial copy".into(), {
        let mut m = DirtyMap::new(1 << 20, 131072);
        m.mark_all();
        m
    });
    full.full = true;
    for (name, s) in [("partial", &st), ("full", &full)] {
        let b = s.encode(&keys);
        let mut file = vec![0u8];
        file.extend_from_slice(&b);
        out.push((format!("file-{name}"), file));
        let mut body = vec![1u8];
        // Without the key id and MAC (4 + 32 bytes): the target adds them.
        body.extend_from_slice(&b[..b.len() - 36]);
        out.push((format!("body-{name}"), body));
    }
    out
}
