//! A model without a uuid field.
use keel_schema::Syncable;

#[derive(Syncable)]
#[syncable(model = "note", domain = "content")]
struct Note {
    text: String,
}

fn main() {}
