//! Pairing on a running node (the inviting side) and `join` (the new device's side).
//!
//! The inviter opens an [`Invitation`]: unpinned devices may then connect, prove the code
//! (SPAKE2 bound to the connection and both certificates, with key confirmation), and after the
//! local user confirms, receive the library key sealed under the session key. Both sides then pin
//! each other. Rate limits, the void-after-5 rule and the device limit live in
//! [`keel_transport::Inviter`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use keel_journal::LibraryKey;
use keel_schema::DeviceId;
use keel_transport::{
    Binding, Connection, DeviceMessage, Endpoint, Identity, InviteRun, Inviter, Joiner,
    PairingCode, PairingError, PairingMessage, Pins,
};
use tokio::sync::{mpsc, oneshot};

use super::devices::DevicesFile;
use super::net::Net;
use crate::error::NodeError;
use keel_engine::Home;
use keel_engine::{now_ms, CreateOptions, Library};

/// How long a joiner has for each pairing step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the inviting user has to answer.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an unpinned connection has to send its pairing start.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A joining device waiting for the inviting user's answer.
#[derive(Debug)]
pub struct Question {
    /// The name the joining device gave.
    pub name: String,
    /// Its device id.
    pub device: DeviceId,
    /// Send `true` to accept.
    pub answer: oneshot::Sender<bool>,
}

/// An open invitation on a node.
pub(crate) struct Invitation {
    pub(crate) inviter: Inviter,
    /// `None`: accept the first device that proves the code (`--yes`).
    pub(crate) questions: Option<mpsc::UnboundedSender<Question>>,
    pub(crate) outcome: Option<oneshot::Sender<Result<(DeviceId, String), PairingError>>>,
    pub(crate) devices: usize,
}

/// What `invite` returns: the code, the questions to answer and the outcome.
#[derive(Debug)]
pub struct InviteHandle {
    /// The code to show the other device's user.
    pub code: PairingCode,
    /// Joining devices to confirm (empty with auto-accept).
    pub questions: mpsc::UnboundedReceiver<Question>,
    /// The paired device (id, name), or why pairing failed for good.
    pub outcome: oneshot::Receiver<Result<(DeviceId, String), PairingError>>,
}

async fn recv_pairing(conn: &Connection) -> Result<PairingMessage, PairingError> {
    match tokio::time::timeout(STEP_TIMEOUT, conn.recv()).await {
        Ok(Ok(DeviceMessage::Pairing(m))) => Ok(m),
        Ok(Ok(_)) => Err(PairingError::Protocol("expected a pairing message".into())),
        Ok(Err(e)) => Err(PairingError::Protocol(e.to_string())),
        Err(_) => Err(PairingError::Protocol("timed out".into())),
    }
}

async fn send_pairing(conn: &Connection, message: PairingMessage) -> Result<(), PairingError> {
    conn.send(&DeviceMessage::Pairing(message))
        .await
        .map_err(|e| PairingError::Protocol(e.to_string()))
}

/// Ends the open invitation if it is still the one with `code`: unpinned handshakes are refused
/// again and its owner hears `why`.
pub(crate) async fn end_invitation(net: &Net, code: &PairingCode, why: PairingError) {
    let mut slot = net.invitation.lock().await;
    let Some(invitation) = slot.as_mut() else {
        return;
    };
    if invitation.inviter.code() != code {
        return;
    }
    if let Some(tx) = invitation.outcome.take() {
        let _ = tx.send(Err(why));
    }
    *slot = None;
    net.endpoint.pins().set_pairing_open(false);
    net.withdraw_invitation();
}

/// Serves one unpinned connection: a pairing run if an invitation is open, else closed.
pub(crate) async fn serve_joiner(net: Arc<Net>, conn: Connection) {
    if !net.endpoint.pins().pairing_open() {
        conn.close("not paired");
        return;
    }
    let binding = match conn.exporter() {
        Ok(exporter) => Binding {
            exporter,
            inviter: net.device,
            joiner: conn.peer(),
        },
        Err(_) => return,
    };
    let address: IpAddr = conn.remote_address().ip();
    // A joiner sends its start at once: an unpinned connection that does not holds one of the
    // few pairing slots for [`START_TIMEOUT`] at most.
    let start = tokio::time::timeout(START_TIMEOUT, recv_pairing(&conn)).await;
    let Ok(Ok(start)) = start else {
        conn.close("pairing: no start");
        return;
    };
    // The invitation's lock is held only between network waits: a peer that goes silent holds
    // up nobody else's pairing.
    let started = {
        let mut slot = net.invitation.lock().await;
        slot.as_mut().map(|invitation| {
            invitation
                .inviter
                .on_start(&start, binding, address, now_ms())
        })
    };
    let (mut run, reply) = match started {
        None => {
            conn.close("no open invitation");
            return;
        }
        Some(Ok(ok)) => ok,
        Some(Err(rejection)) => {
            let _ = send_pairing(&conn, rejection).await;
            linger(&conn).await;
            return;
        }
    };
    if send_pairing(&conn, reply).await.is_err() {
        return;
    }
    let Ok(confirm) = recv_pairing(&conn).await else {
        return;
    };
    let proven = {
        let mut slot = net.invitation.lock().await;
        slot.as_mut().map(|invitation| {
            let devices = invitation.devices;
            let checked = invitation
                .inviter
                .check_proof(&mut run, &confirm, devices, now_ms());
            (checked, invitation.questions.clone())
        })
    };
    let Some((checked, questions)) = proven else {
        conn.close("the invitation ended");
        return;
    };
    let answer = match (&checked, &questions) {
        // Only now, with the code proven, is the user asked.
        (Ok(()), Some(questions)) => ask(questions, &run).await,
        _ => true,
    };
    let Some(decided) = decide(&net, &mut run, checked, answer, address).await else {
        conn.close("the invitation ended");
        return;
    };
    let _ = send_pairing(&conn, decided).await;
    linger(&conn).await;
}

/// The joiner's side of the exchange: its start, the inviter's reply, its confirmation, then
/// the verdict (the inviting user may take a while). Returns the joiner and the verdict.
async fn exchange(
    conn: &Connection,
    (mut joiner, start): (Joiner, PairingMessage),
) -> Result<(Joiner, PairingMessage), NodeError> {
    // An inviter with no open invitation refuses the handshake; the joiner sees it on its
    // first exchange, as a connection error.
    send_pairing(conn, start)
        .await
        .map_err(|_| PairingError::NoInvitation)?;
    let reply = match tokio::time::timeout(STEP_TIMEOUT, conn.recv()).await {
        Ok(Ok(DeviceMessage::Pairing(m))) => m,
        Ok(Ok(_)) => return Err(PairingError::Protocol("expected a reply".into()).into()),
        Ok(Err(_)) => return Err(PairingError::NoInvitation.into()),
        Err(_) => return Err(PairingError::Protocol("timed out".into()).into()),
    };
    let confirm = joiner.on_reply(&reply)?;
    send_pairing(conn, confirm).await?;
    // The inviting user may take a while to confirm.
    let verdict = match tokio::time::timeout(CONFIRM_TIMEOUT + STEP_TIMEOUT, conn.recv()).await {
        Ok(Ok(DeviceMessage::Pairing(m))) => m,
        Ok(Ok(_)) => return Err(PairingError::Protocol("expected a verdict".into()).into()),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(PairingError::Protocol("timed out".into()).into()),
    };
    Ok((joiner, verdict))
}

/// Under the invitation's lock: the verdict on a run whose proof was checked, and the end of
/// the invitation if the run ends it. `None` when the invitation ended meanwhile.
async fn decide(
    net: &Net,
    run: &mut InviteRun,
    checked: Result<(), (PairingMessage, PairingError)>,
    answer: bool,
    address: IpAddr,
) -> Option<PairingMessage> {
    let mut slot = net.invitation.lock().await;
    let invitation = slot.as_mut()?;
    let (verdict, outcome) = match checked {
        Err((rejection, error)) => (rejection, Err(error)),
        Ok(()) => invitation.inviter.decide(run, answer),
    };
    let finished = settle_outcome(net, run, &outcome, address);
    if let Some(result) = finished {
        if let Some(tx) = invitation.outcome.take() {
            let _ = tx.send(result);
        }
        *slot = None;
        net.endpoint.pins().set_pairing_open(false);
        net.withdraw_invitation();
    }
    Some(verdict)
}

/// Asks the user whether the joining device may join; no answer within [`CONFIRM_TIMEOUT`] is a
/// no.
async fn ask(questions: &mpsc::UnboundedSender<Question>, run: &InviteRun) -> bool {
    let (tx, rx) = oneshot::channel();
    let asked = questions.send(Question {
        name: run.joiner_name().to_string(),
        device: run.joiner(),
        answer: tx,
    });
    asked.is_ok()
        && matches!(
            tokio::time::timeout(CONFIRM_TIMEOUT, rx).await,
            Ok(Ok(true))
        )
}

/// Commits this device's endorsement of `device`, which its user has just let in: every other
/// device trusts `device` through it (see `Core::refresh_pins`).
fn endorse(net: &Net, device: DeviceId) {
    let Some(link) = net.link.upgrade() else {
        return;
    };
    let endorsement = keel_schema::Endorsement {
        uuid: uuid::Uuid::new_v4(),
        device_id: device.to_hex(),
        by: net.device.to_hex(),
        created_ms: i64::try_from(now_ms()).unwrap_or(i64::MAX),
    };
    let committed = link.library().transact(|tx| {
        tx.upsert(&endorsement);
        Ok(())
    });
    if let Err(e) = committed {
        tracing::warn!(error = %e, "could not commit the endorsement of a paired device");
    }
}

/// Pins and records a device that paired; returns what ends the invitation (a pairing, or a
/// voided code, a declined device, a full library), `None` when it stays open.
fn settle_outcome(
    net: &Net,
    run: &InviteRun,
    outcome: &Result<DeviceId, PairingError>,
    address: IpAddr,
) -> Option<Result<(DeviceId, String), PairingError>> {
    match outcome {
        Ok(device) => {
            net.endpoint.pins().pin(*device);
            endorse(net, *device);
            if let Ok(mut file) = DevicesFile::read(&net.library_dir) {
                file.add(*device, run.joiner_name(), None, now_ms());
                if let Err(e) = file.write(&net.library_dir) {
                    tracing::warn!(error = %e, "could not record the paired device");
                }
            }
            tracing::info!(device = %device.short(), name = run.joiner_name(), "device paired");
            Some(Ok((*device, run.joiner_name().to_string())))
        }
        Err(error) => {
            tracing::warn!(%error, %address, "pairing attempt refused");
            // A voided code, a declined device or a full library end the invitation.
            match error {
                PairingError::Voided | PairingError::Declined | PairingError::DeviceLimit(_) => {
                    Some(Err(error.clone()))
                }
                _ => None,
            }
        }
    }
}

/// Gives the joiner time to read the last message before the connection goes (it closes first).
async fn linger(conn: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.recv()).await;
}

/// How long `join` with no address looks for an inviting device on the LAN.
const DISCOVERY_WAIT: Duration = Duration::from_secs(5);

/// Connects to the first of `candidates` that answers, to pair: the endpoint, the connection
/// and the address that answered.
async fn connect_to_inviter(
    identity: &Identity,
    bind: Option<SocketAddr>,
    candidates: &[SocketAddr],
) -> Result<(Endpoint, Connection, SocketAddr), NodeError> {
    let mut last = NodeError::Failed("no address to pair with".into());
    // One address the user gave gets the whole step; several found on the LAN (some of them
    // unreachable from here) get a few seconds each.
    let wait = if candidates.len() > 1 {
        Duration::from_secs(5)
    } else {
        STEP_TIMEOUT
    };
    for addr in candidates.iter().copied() {
        let bind: SocketAddr = bind.unwrap_or(if addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        });
        let endpoint = Endpoint::bind(identity, bind, Pins::new())?;
        match tokio::time::timeout(wait, endpoint.connect_to_pair(addr)).await {
            Ok(Ok(conn)) => return Ok((endpoint, conn, addr)),
            Ok(Err(e)) => last = e.into(),
            Err(_) => last = NodeError::Failed(format!("no answer from {addr}")),
        }
        endpoint.close();
    }
    Err(last)
}

/// Options for [`join`].
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The inviting node's address; `None`: look for it on the LAN with `discovery`.
    pub addr: Option<SocketAddr>,
    /// Where to look for the inviting node when no address is given (mDNS port, interfaces).
    pub discovery: super::Discovery,
    /// The local address to pair from (default: any, port 0).
    pub bind: Option<SocketAddr>,
    /// The code it showed.
    pub code: String,
    /// This device's name as the inviter sees it.
    pub device_name: Option<String>,
    /// This device's password for the library (wraps the received key).
    pub password: String,
    /// Key-derivation parameters for wrapping it.
    pub create: CreateOptions,
    /// After pairing, fetch the log and a copy of the inviter's projections
    /// (see [`crate::SnapshotOutcome`]) rather than leave the whole log to replicate
    /// and replay once the node starts. If the fetch fails, the library is still usable: the
    /// node catches up from whatever log was stored.
    pub snapshot: bool,
    /// Hears how far the snapshot fetch has come.
    pub progress: Option<mpsc::UnboundedSender<super::JoinProgress>>,
    /// When the fetch leaves the file's copy for a backfill (a slow link to a compacted
    /// inviter).
    pub slow_link: super::SlowLink,
}

/// Pairs this home's device with a running node and creates the library here. Returns the
/// library's name here (the inviter's, or `NAME-2`… when this home has a library of that name);
/// `serve` then reaches the inviter without `--peer`. To bring a library this device built
/// alone into the joined one, merge it afterwards (`keel_engine::Library::merge_from`).
pub async fn join(home: &Home, options: JoinOptions) -> Result<String, NodeError> {
    use tracing::Instrument;
    let span = tracing::info_span!("join", addr = ?options.addr);
    join_in(home, options).instrument(span).await
}

async fn join_in(home: &Home, options: JoinOptions) -> Result<String, NodeError> {
    let code = PairingCode::parse(&options.code)
        .ok_or_else(|| NodeError::Pairing(PairingError::Protocol("malformed code".into())))?;
    let device = home.device()?;
    let identity = Identity::from_parts(device.cert_der, device.key_der);
    let candidates = match options.addr {
        Some(addr) => vec![addr],
        None => super::discovery::find_inviter(&options.discovery, DISCOVERY_WAIT).await?,
    };
    let (endpoint, conn, addr) = connect_to_inviter(&identity, options.bind, &candidates).await?;
    let binding = Binding {
        exporter: conn.exporter()?,
        inviter: conn.peer(),
        joiner: endpoint.device(),
    };
    let name = options
        .device_name
        .clone()
        .unwrap_or_else(|| device.name.clone());
    let joiner = Joiner::start(&code, binding, &name);
    let (joiner, verdict) = exchange(&conn, joiner).await?;
    let joined = joiner.on_verdict(&verdict)?;
    conn.close("paired");
    let key = LibraryKey::from_bytes(&joined.key)
        .ok_or_else(|| PairingError::Protocol("the library key has the wrong length".into()))?;
    let local_name = free_name(home, &joined.name)?;
    let library = Library::create_joined(
        home,
        &local_name,
        &options.password,
        joined.library,
        &key,
        options.create,
        options.device_name.as_deref(),
    )?;
    let mut file = DevicesFile::read(library.dir())?;
    file.add(joined.inviter, "inviter", Some(addr), now_ms());
    file.write(library.dir())?;
    let dir = library.dir().to_path_buf();
    library.close()?;
    if options.snapshot {
        match super::snapshot::fetch(
            &endpoint,
            joined.inviter,
            addr,
            (joined.library, &home.models().fingerprint()),
            &key,
            (&dir, options.slow_link),
            options.progress,
        )
        .await
        {
            Err(NodeError::SlowLink { bytes_per_s }) => tracing::info!(
                bytes_per_s,
                "the link is slow: the node backfills from the inviter's snapshot instead"
            ),
            Ok(done) => tracing::info!(
                log_entries = done.log_entries,
                applied = done.applied.0,
                file_bytes = done.file_bytes,
                ms = done.elapsed.as_millis() as u64,
                "initial sync by snapshot"
            ),
            Err(error) => tracing::warn!(
                %error,
                "initial sync by snapshot failed; the node catches up by replication instead"
            ),
        }
    }
    endpoint.close();
    Ok(local_name)
}

/// `name`, or if this home has a library of that name already (one of its own, to merge into
/// the joined one: see `keel_engine::Library::merge_from`), the first free `name-2`, `name-3`…
fn free_name(home: &Home, name: &str) -> Result<String, NodeError> {
    let taken = home.libraries()?;
    let mut candidate = name.to_string();
    let mut n = 1;
    while taken.contains(&candidate) {
        n += 1;
        candidate = format!("{name}-{n}");
    }
    Ok(candidate)
}
