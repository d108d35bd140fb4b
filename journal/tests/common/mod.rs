//! Helpers shared by the journal's integration tests.

use keel_schema::{Change, ChangeId, DeviceId, Hlc, Tag};
use uuid::Uuid;

/// A tag upsert by `device`, its clock and name numbered by `n`.
pub(crate) fn change(device: DeviceId, n: u64) -> Change {
    let tag = Tag {
        uuid: Uuid::now_v7(),
        name: format!("t{n}"),
        color: None,
        created_ms: 0,
    };
    let hlc = Hlc {
        physical_ms: 1000 + n,
        counter: 0,
        device,
    };
    Change::upsert(ChangeId::new(), hlc, &tag).expect("sync-ready")
}
