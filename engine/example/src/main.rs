//! A minimal host app: its own model, two devices of one library in one process, on loopback.
//! The first creates the library and invites; the second joins with the code, and hears the
//! first's albums on its event bus as they arrive.
//!
//! `cargo run -p keel-example`

use std::time::Duration;

use keel_engine::{CreateOptions, Event, Home, KdfParams, Library, Syncable, Uuid};
use keel_node::{join, JoinOptions, Node, NodeOptions};

const PASSWORD: &str = "an example password";

/// The app's own model: an album of photos. Its code is its name in every change, for good.
#[derive(Clone, Debug, PartialEq, Eq, Syncable)]
#[syncable(model = "album", code = 32, domain = "content")]
struct Album {
    #[syncable(uuid)]
    uuid: Uuid,
    name: String,
    /// The cover photo's content, if any (a reference to one of Keel's models).
    #[syncable(references = "content_identity")]
    cover: Option<Uuid>,
}

/// The app's home on this device: Keel's models and its own.
fn home(dir: &std::path::Path) -> Result<Home, keel_engine::EngineError> {
    Home::new(dir).with_model::<Album>()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // A real app keeps the recommended key derivation (the default); an example runs fast.
    let fast = || CreateOptions {
        kdf: KdfParams::INSECURE_FAST,
    };
    let on_loopback = NodeOptions {
        discovery: None,
        ..NodeOptions::default()
    };

    // Device A: a library and a node that invites.
    let home_a = home(&dir.path().join("a"))?;
    let a = Node::start(
        Library::create(&home_a, "photos", PASSWORD, fast())?,
        on_loopback.clone(),
    )?;
    let invite = a.invite(true)?;
    println!("A invites with code {}", invite.code.as_str());

    // Device B: joins with the code (the user would type it), then runs its own node.
    let home_b = home(&dir.path().join("b"))?;
    let joining = JoinOptions {
        addr: Some(a.local_addr()),
        discovery: keel_node::Discovery::default(),
        bind: None,
        code: invite.code.as_str().into(),
        device_name: Some("phone".into()),
        password: PASSWORD.into(),
        create: fast(),
        snapshot: true,
        progress: None,
        slow_link: keel_node::SlowLink::default(),
    };
    let name = tokio::runtime::Runtime::new()?.block_on(join(&home_b, joining))?;
    let b = Node::start(Library::open(&home_b, &name, PASSWORD)?, on_loopback)?;
    b.wait_in_sync(Duration::from_secs(10))?;
    println!("B joined {name} and is in sync");

    // A writes; B hears it on its bus.
    let mut events = b.library().subscribe();
    let album = Album {
        uuid: Uuid::new_v4(),
        name: "Holidays".into(),
        cover: None,
    };
    a.library().transact(|tx| {
        tx.upsert(&album);
        Ok(())
    })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if std::time::Instant::now() > deadline {
            return Err("B never heard of the album".into());
        }
        let Ok(event) = events.try_recv() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        // Events serialize as they are, for a web view.
        println!("B heard {}", serde_json::to_string(&event)?);
        if let Event::RecordsChanged { records, .. } = &event {
            if records.iter().any(|(_, uuid, _)| *uuid == album.uuid) {
                break;
            }
        }
    }
    let got = b
        .library()
        .get::<Album>(album.uuid)?
        .ok_or("B has no album")?;
    println!("B has the album {:?}", got.name);
    b.stop()?;
    a.stop()?;
    Ok(())
}
