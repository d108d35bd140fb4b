//! A model without a uuid field.
use keel_schema::Syncable;

#[derive(Syncable)]
#[syncable(model = "note", code = 40, domain = "content")]
struct Note {
    text: String,
}

fn main() {}
