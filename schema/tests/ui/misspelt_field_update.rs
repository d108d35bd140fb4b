//! A typed update names its fields by method: a misspelt field does not compile (issue 25).
use keel_schema::Syncable;
use keel_schema::uuid::Uuid;

#[derive(Syncable)]
#[syncable(model = "note", code = 40, domain = "content")]
struct Note {
    #[syncable(uuid)]
    uuid: Uuid,
    text: String,
}

fn main() {
    let _ = NoteUpdate::new(Uuid::nil()).txet("typo".into());
}
