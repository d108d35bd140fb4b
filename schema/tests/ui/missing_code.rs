//! A model with no stable code: its changes could not name it.
use keel_schema::Syncable;
use keel_schema::uuid::Uuid;

#[derive(Syncable)]
#[syncable(model = "note", domain = "content")]
struct Note {
    #[syncable(uuid)]
    uuid: Uuid,
    text: String,
}

fn main() {}
