//! A field added by version 1 placed before an older one would move the older one's index.
use keel_schema::Syncable;
use keel_schema::uuid::Uuid;

#[derive(Syncable)]
#[syncable(model = "note", code = 40, version = 1, domain = "content")]
struct Note {
    #[syncable(uuid)]
    uuid: Uuid,
    #[syncable(since = 1)]
    rating: i64,
    text: String,
}

fn main() {}
