//! `breaks_cycle` on a reference that cannot be null.
use keel_schema::Syncable;
use keel_schema::uuid::Uuid;

#[derive(Syncable)]
#[syncable(model = "note", code = 40, domain = "content")]
struct Note {
    #[syncable(uuid)]
    uuid: Uuid,
    #[syncable(references = "tag", breaks_cycle)]
    tag: Uuid,
}

fn main() {}
