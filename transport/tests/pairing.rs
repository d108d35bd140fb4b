//! The pairing protocol: right code, wrong code, expired code, rate limit, voided code, device
//! limit, declined confirmation, and a relayed (man-in-the-middle) run that the binding defeats.

use std::net::IpAddr;

use keel_schema::{DeviceId, LibraryId};
use keel_transport::{
    Binding, Inviter, Joiner, PairingCode, PairingError, PairingMessage, CODE_FAILURES_MAX,
    CODE_TTL_MS, RATE_FAILURES_MAX,
};
use uuid::Uuid;

const KEY: &[u8] = &[42u8; 32];

fn binding(exporter: u8) -> Binding {
    Binding {
        exporter: [exporter; 32],
        inviter: DeviceId([1; 32]),
        joiner: DeviceId([2; 32]),
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Runs one attempt; returns the joiner's outcome and the inviter's.
fn attempt(
    inviter: &mut Inviter,
    code: &PairingCode,
    (joiner_binding, inviter_binding): (Binding, Binding),
    address: IpAddr,
    devices: usize,
    accept: bool,
    now: u64,
) -> (
    Result<keel_transport::Joined, PairingError>,
    Result<DeviceId, PairingError>,
) {
    let (mut joiner, start) = Joiner::start(code, joiner_binding, "laptop");
    let (mut run, reply) = match inviter.on_start(&start, inviter_binding, address, now) {
        Ok(ok) => ok,
        Err(rejection) => {
            let joined = joiner
                .on_reply(&rejection)
                .and_then(|_| Err(PairingError::Protocol("?".into())));
            return (
                joined,
                Err(PairingError::Protocol("refused at start".into())),
            );
        }
    };
    let confirm = joiner.on_reply(&reply).expect("reply is well formed");
    let (verdict, inviter_outcome) =
        inviter.on_confirm(&mut run, &confirm, devices, |_, _| accept, now);
    (joiner.on_verdict(&verdict), inviter_outcome)
}

fn new_inviter(limit: usize) -> Inviter {
    Inviter::new(LibraryId(Uuid::nil()), "family", KEY.to_vec(), limit, 0)
}

#[test]
fn the_right_code_pairs_and_transfers_the_key() {
    let mut inviter = new_inviter(16);
    let code = inviter.code().clone();
    let (joined, pinned) = attempt(
        &mut inviter,
        &code,
        (binding(7), binding(7)),
        ip(1),
        1,
        true,
        10,
    );
    let joined = joined.expect("joins");
    assert_eq!(joined.key, KEY);
    assert_eq!(joined.name, "family");
    assert_eq!(joined.inviter, DeviceId([1; 32]));
    assert_eq!(pinned, Ok(DeviceId([2; 32])));
    assert_eq!(
        PairingCode::parse(&code.as_str().replace('-', "")),
        Some(code)
    );
    assert_eq!(PairingCode::parse("12a4-5678"), None);
}

#[test]
fn a_wrong_code_fails_and_repeated_failures_are_limited_then_void_the_code() {
    let mut inviter = new_inviter(16);
    let wrong = PairingCode::parse("0000-0000")
        .filter(|c| c != inviter.code())
        .unwrap_or_else(|| PairingCode::parse("1111-1111").expect("valid"));
    for _ in 0..RATE_FAILURES_MAX {
        let (joined, outcome) = attempt(
            &mut inviter,
            &wrong,
            (binding(1), binding(1)),
            ip(1),
            1,
            true,
            100,
        );
        assert_eq!(joined, Err(PairingError::WrongCode));
        assert_eq!(outcome, Err(PairingError::WrongCode));
    }
    // Same address: rate limited, even with the right code.
    let right = inviter.code().clone();
    let (joined, _) = attempt(
        &mut inviter,
        &right,
        (binding(1), binding(1)),
        ip(1),
        1,
        true,
        200,
    );
    assert_eq!(joined, Err(PairingError::RateLimited));
    // Other addresses keep failing until the code is void.
    let mut last = Err(PairingError::WrongCode);
    for n in RATE_FAILURES_MAX..CODE_FAILURES_MAX {
        last = attempt(
            &mut inviter,
            &wrong,
            (binding(1), binding(1)),
            ip(n as u8 + 10),
            1,
            true,
            300,
        )
        .1;
    }
    assert_eq!(last, Err(PairingError::Voided));
    let (joined, _) = attempt(
        &mut inviter,
        &right,
        (binding(1), binding(1)),
        ip(99),
        1,
        true,
        400,
    );
    assert_eq!(joined, Err(PairingError::Voided));
    // After the window the address is allowed again, but the code stays void.
    let (joined, _) = attempt(
        &mut inviter,
        &right,
        (binding(1), binding(1)),
        ip(1),
        1,
        true,
        400 + 120_000,
    );
    assert_eq!(joined, Err(PairingError::Voided));
}

#[test]
fn an_expired_code_is_refused() {
    let mut inviter = new_inviter(16);
    let code = inviter.code().clone();
    let (joined, _) = attempt(
        &mut inviter,
        &code,
        (binding(1), binding(1)),
        ip(1),
        1,
        true,
        CODE_TTL_MS + 1,
    );
    assert_eq!(joined, Err(PairingError::Expired));
}

#[test]
fn device_limit_and_declined_confirmation_are_refused() {
    let mut inviter = new_inviter(2);
    let code = inviter.code().clone();
    let (joined, outcome) = attempt(
        &mut inviter,
        &code,
        (binding(1), binding(1)),
        ip(1),
        2,
        true,
        1,
    );
    assert_eq!(joined, Err(PairingError::DeviceLimit(2)));
    assert_eq!(outcome, Err(PairingError::DeviceLimit(2)));
    let (joined, outcome) = attempt(
        &mut inviter,
        &code,
        (binding(1), binding(1)),
        ip(1),
        1,
        false,
        2,
    );
    assert_eq!(joined, Err(PairingError::Declined));
    assert_eq!(outcome, Err(PairingError::Declined));
}

#[test]
fn a_relayed_run_fails_because_each_side_is_bound_to_its_own_connection() {
    // A relay in the middle holds two TLS connections: the exporters differ, so even the right
    // code does not confirm.
    let mut inviter = new_inviter(16);
    let code = inviter.code().clone();
    let (joined, outcome) = attempt(
        &mut inviter,
        &code,
        (binding(1), binding(2)),
        ip(1),
        1,
        true,
        1,
    );
    assert_eq!(joined, Err(PairingError::WrongCode));
    assert_eq!(outcome, Err(PairingError::WrongCode));
    let _ = PairingMessage::Rejected {
        reason: String::new(),
    };
}
