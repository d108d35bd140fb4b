//! A field attribute that does not exist.
use keel_schema::Syncable;
use keel_schema::uuid::Uuid;

#[derive(Syncable)]
#[syncable(model = "note", code = 40, domain = "content")]
struct Note {
    #[syncable(uuid)]
    uuid: Uuid,
    #[syncable(refernces = "tag")]
    tag: Uuid,
}

fn main() {}
