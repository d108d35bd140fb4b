//! A domain that does not exist.
use keel_schema::Syncable;
use keel_schema::uuid::Uuid;

#[derive(Syncable)]
#[syncable(model = "note", code = 40, domain = "everywhere")]
struct Note {
    #[syncable(uuid)]
    uuid: Uuid,
}

fn main() {}
