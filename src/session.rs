//! The server side of one connection, as a state machine with no I/O and no
//! clock: the driver (a shard) feeds it decoded frames and the current time,
//! and carries out the [`Action`]s it emits.
//!
//! ```text
//! Handshaking --Auth ok--> Authenticated --activate()--> Active
//!      |                                                   |
//!      +--- bad frame / bad token / auth deadline ---------+--> Closing --> Closed
//! ```
//!
//! `Authenticated` is the short pause in which the shard decides where the
//! session lives (it may hand the connection to the device's owner shard)
//! and replaces an older login of the same device; `activate` then sends
//! `AuthOk`. The struct is 16 bytes: every byte here is paid per connection.
//!
//! The token's expiry is kept (in seconds of the monotonic clock): once it
//! passes, an active session closes with `TOKEN_EXPIRED`, unless the client
//! sent a `Refresh` with a newer token, which moves it.
//!
//! Control frames (Ping, Refresh, Join, Leave) draw on a per-session
//! budget ([`ControlBudget`]): a leaky bucket whose level (16 bits) shares a
//! word with the deadline and leaks from the last frame's time, which the
//! idle deadline already tells. A client over it is closed with
//! `RATE_LIMITED`; upstream Requests have their own limit in the shard.

use crate::protocol::codec::{CodecError, Frame};
use crate::protocol::codes;
use crate::protocol::limits::{check_id, fits_field};
use crate::protocol::proto::{self, ErrorCode};
use crate::protocol::time::{Millis, Now};
use crate::protocol::token::{Keyring, TokenError};

/// Settings shared by every session of a shard (borrowed, never copied
/// into a session).
#[derive(Clone, Debug)]
pub struct Params {
    pub keyring: Keyring,
    pub clock_leeway_secs: u32,
    pub auth_timeout_ms: u64,
    pub heartbeat_min_ms: u32,
    pub heartbeat_default_ms: u32,
    pub heartbeat_max_ms: u32,
    pub idle_timeout_factor: u32,
    pub close_linger_ms: u64,
    /// Longest accepted user, device, app, platform or version string.
    pub max_id_bytes: usize,
    /// The per-session budget of control frames.
    pub control: ControlBudget,
}

/// How many control frames (Ping, Refresh, Join, Leave) a session may
/// send: `burst` at once, then `per_sec` a second. Kept as a leaky bucket
/// in ms: each frame adds `interval_ms`, the level leaks 1 per ms, and a
/// frame that would take it over `burst_ms` is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlBudget {
    interval_ms: u32,
    burst_ms: u32,
}

impl ControlBudget {
    /// No limit.
    pub const OFF: ControlBudget = ControlBudget { interval_ms: 0, burst_ms: 0 };

    /// `per_sec` frames a second (0: no limit) after a burst of `burst`.
    /// The level must fit its 16 bits: the config checks
    /// `burst x ceil(1000 / per_sec) <= 65535`; more is clamped.
    pub fn new(per_sec: u32, burst: u32) -> ControlBudget {
        if per_sec == 0 {
            return ControlBudget::OFF;
        }
        let interval_ms = 1000u32.div_ceil(per_sec.min(1000));
        let burst_ms = burst.max(1).saturating_mul(interval_ms).min(u32::from(u16::MAX));
        ControlBudget { interval_ms, burst_ms }
    }
}

impl Params {
    /// The client's heartbeat request (0 = default) clamped to the bounds.
    pub fn negotiate_heartbeat(&self, requested_ms: u32) -> u32 {
        if requested_ms == 0 {
            self.heartbeat_default_ms
        } else {
            requested_ms.clamp(self.heartbeat_min_ms, self.heartbeat_max_ms)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Handshaking,
    /// Token verified; waiting for the shard to call [`Session::activate`].
    Authenticated,
    Active,
    /// Last frames are being flushed; input is discarded.
    Closing,
    Closed,
}

/// Everything a verified `Auth` frame told us, for the shard to register.
#[derive(Clone, Debug, PartialEq)]
pub struct Login {
    pub user: String,
    pub device: String,
    pub app: String,
    pub platform: String,
    pub client_version: String,
    pub capabilities: u32,
    pub last_seq: u64,
    pub heartbeat_ms: u32,
    /// The store incarnation the client saw last (0: none).
    pub store_incarnation: u64,
    /// Groups the token lets the client JOIN (patterns, see
    /// [`crate::groups::matches`]).
    pub groups: Vec<String>,
    /// The token's expiry and issue time, unix seconds.
    pub expires_at: i64,
    pub issued_at: i64,
}

/// What the session asks its driver to do, in order.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Encode and queue this frame.
    Send(Frame),
    /// A valid Auth arrived: register the login (possibly on another shard),
    /// then call [`Session::activate`].
    Authenticated(Box<Login>),
    /// Stop reading; flush what is queued, then close. Sent after the
    /// `Error`/`Kicked` frame that explains it.
    Close(ErrorCode),
    /// The client asks to join a group.
    Join(String),
    /// The client asks to leave a group.
    Leave(String),
    /// An upstream request for a service's backend (the shard forwards it
    /// and queues the `Response`).
    Request(proto::Request),
    /// The client processed every at-least-once message up to this
    /// sequence (cumulative).
    Ack(u64),
    /// A `Refresh` carried a valid token: if it names the session's user
    /// and device, call [`Session::refreshed`], else close with
    /// `INVALID_TOKEN`.
    Refresh(Box<Refreshed>),
}

/// The claims of a valid `Refresh` token the shard must match.
#[derive(Clone, Debug, PartialEq)]
pub struct Refreshed {
    pub user: String,
    pub device: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub issued_at: i64,
}

/// `expires_s` of a session whose token never expires.
const NEVER: u32 = u32::MAX;
/// The low bits of `deadline_word` hold the deadline (ms of the monotonic
/// clock: 8,900 years fit), the high 16 the control budget's level.
const DEADLINE_BITS: u32 = 48;
const DEADLINE_MASK: u64 = (1 << DEADLINE_BITS) - 1;
/// The low bits of `packed` hold the idle timeout, the high ones the phase.
const IDLE_BITS: u32 = 29;
const IDLE_MASK: u32 = (1 << IDLE_BITS) - 1;

/// Per-connection protocol state. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// When the current phase times out: auth deadline, idle deadline or
    /// end of the closing linger; and in the top 16 bits the control
    /// budget's level (ms of debt). Packed so the budget costs no byte.
    deadline_word: u64,
    /// Silence allowed once active, in ms (factor x negotiated heartbeat,
    /// at most 2^29 - 1, six days), and the phase in the top 3 bits: packed
    /// so the token's expiry fits without growing the struct.
    packed: u32,
    /// When the token (plus the clock leeway) expires, in whole seconds of
    /// the monotonic clock `deadline` uses, rounded up; [`NEVER`] before Auth.
    expires_s: u32,
}

impl Session {
    pub fn new(now: Millis, params: &Params) -> Session {
        let mut s = Session { deadline_word: 0, packed: 0, expires_s: NEVER };
        s.set_deadline(now.add_ms(params.auth_timeout_ms));
        s.set_phase(Phase::Handshaking);
        s
    }

    /// A session carried over from another process by the in-place upgrade
    /// ([`crate::upgrade`]), in the phase and with the deadline it had there.
    /// `expires_in_ms`: time left on its token there (`None`: never
    /// expires, or not authenticated yet).
    pub fn restored(
        phase: Phase,
        now: Millis,
        deadline: Millis,
        idle_timeout_ms: u32,
        expires_in_ms: Option<u64>,
    ) -> Session {
        let expires_s = expires_in_ms.map_or(NEVER, |ms| mono_secs(now.0.saturating_add(ms)));
        let mut s = Session { deadline_word: 0, packed: idle_timeout_ms & IDLE_MASK, expires_s };
        s.set_deadline(deadline);
        s.set_phase(phase);
        s
    }

    /// Time left on the token at `now` (`None`: it never expires), for the
    /// in-place upgrade.
    pub fn expires_in_ms(&self, now: Millis) -> Option<u64> {
        (self.expires_s != NEVER).then(|| self.expiry().0.saturating_sub(now.0))
    }

    pub fn phase(&self) -> Phase {
        match self.packed >> IDLE_BITS {
            0 => Phase::Handshaking,
            1 => Phase::Authenticated,
            2 => Phase::Active,
            3 => Phase::Closing,
            _ => Phase::Closed,
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        let bits = match phase {
            Phase::Handshaking => 0,
            Phase::Authenticated => 1,
            Phase::Active => 2,
            Phase::Closing => 3,
            Phase::Closed => 4,
        };
        self.packed = (self.packed & IDLE_MASK) | (bits << IDLE_BITS);
    }

    /// When the session next needs [`Session::handle_timeout`]: its phase's
    /// deadline or, once active, its token's expiry if that comes first.
    pub fn deadline(&self) -> Millis {
        match self.phase() {
            Phase::Active => self.phase_deadline().min(self.expiry()),
            _ => self.phase_deadline(),
        }
    }

    fn set_deadline(&mut self, at: Millis) {
        self.deadline_word = (self.deadline_word & !DEADLINE_MASK) | at.0.min(DEADLINE_MASK);
    }

    /// The control budget's level: ms of debt, leaking one per ms.
    fn control_level(&self) -> u64 {
        self.deadline_word >> DEADLINE_BITS
    }

    fn set_control_level(&mut self, level: u64) {
        self.deadline_word = (self.deadline_word & DEADLINE_MASK) | (level.min(u64::from(u16::MAX)) << DEADLINE_BITS);
    }

    /// Charges a control frame to the budget (see [`ControlBudget`]);
    /// false when it is over.
    fn admit_control(&mut self, now: Millis, budget: ControlBudget) -> bool {
        if budget.interval_ms == 0 {
            return true;
        }
        // Leaks the level up to now.
        self.touch(now);
        let level = self.control_level() + u64::from(budget.interval_ms);
        if level > u64::from(budget.burst_ms) {
            return false;
        }
        self.set_control_level(level);
        true
    }

    /// The phase's own deadline (auth, idle, linger), without the token's
    /// expiry: what the in-place upgrade carries beside the expiry.
    pub fn phase_deadline(&self) -> Millis {
        Millis(self.deadline_word & DEADLINE_MASK)
    }

    /// When the token expires on the monotonic clock (far away: never).
    pub fn expiry(&self) -> Millis {
        Millis(u64::from(self.expires_s) * 1000)
    }

    pub fn idle_timeout_ms(&self) -> u32 {
        self.packed & IDLE_MASK
    }

    /// Whether `activate` ran (AuthOk was sent), even if the session is
    /// closing now. The idle timeout is set there and is never 0 (the
    /// heartbeat and the factor are both at least 1).
    pub fn was_activated(&self) -> bool {
        self.idle_timeout_ms() != 0
    }

    /// Whether input should still be decoded and fed in.
    pub fn wants_input(&self) -> bool {
        matches!(self.phase(), Phase::Handshaking | Phase::Active)
    }

    /// Feeds one decoded frame.
    pub fn handle_frame(&mut self, now: Now, frame: Frame, params: &Params, out: &mut Vec<Action>) {
        let control = matches!(frame, Frame::Ping | Frame::Refresh(_) | Frame::Join(_) | Frame::Leave(_));
        if control && self.phase() == Phase::Active && !self.admit_control(now.mono, params.control) {
            let why = "too many Ping, Refresh, Join or Leave frames; slow down";
            return self.fail(now, ErrorCode::RateLimited, why.into(), params, out);
        }
        match (self.phase(), frame) {
            (Phase::Handshaking, Frame::Auth(auth)) => self.on_auth(now, auth, params, out),
            (Phase::Handshaking, other) => self.fail(
                now,
                ErrorCode::BadFrame,
                format!("first frame must be Auth, got {:?}", other.kind()),
                params,
                out,
            ),
            (Phase::Active, Frame::Ping) => {
                self.touch(now.mono);
                out.push(Action::Send(Frame::Pong));
            }
            (Phase::Active, Frame::Join(m) | Frame::Leave(m)) if check_id(&m.group, params.max_id_bytes).is_err() => {
                self.fail(
                    now,
                    ErrorCode::BadFrame,
                    format!("group name must be 1 to {} bytes", params.max_id_bytes),
                    params,
                    out,
                )
            }
            (Phase::Active, Frame::Join(m)) => {
                self.touch(now.mono);
                out.push(Action::Join(m.group));
            }
            (Phase::Active, Frame::Leave(m)) => {
                self.touch(now.mono);
                out.push(Action::Leave(m.group));
            }
            (Phase::Active, Frame::Request(r)) if check_id(&r.service_id, params.max_id_bytes).is_err() => self.fail(
                now,
                ErrorCode::BadFrame,
                format!("Request.service_id must be 1 to {} bytes", params.max_id_bytes),
                params,
                out,
            ),
            (Phase::Active, Frame::Request(r)) => {
                self.touch(now.mono);
                out.push(Action::Request(r));
            }
            (Phase::Active, Frame::Ack(a)) => {
                self.touch(now.mono);
                out.push(Action::Ack(a.seq));
            }
            (Phase::Active, Frame::Refresh(r)) => {
                self.touch(now.mono);
                match params.keyring.verify(&r.token, now.unix_secs(), params.clock_leeway_secs) {
                    Ok(claims) => out.push(Action::Refresh(Box::new(Refreshed {
                        user: claims.user,
                        device: claims.device,
                        expires_at: claims.expires_at,
                        issued_at: claims.issued_at,
                    }))),
                    Err(err) => self.reject_token(now, &err, params, out),
                }
            }
            (Phase::Active, other) => self.fail(
                now,
                ErrorCode::BadFrame,
                format!("unexpected {:?} frame from a client", other.kind()),
                params,
                out,
            ),
            // Input after a close decision is dropped unread.
            (Phase::Authenticated | Phase::Closing | Phase::Closed, _) => {}
        }
    }

    /// Reports a framing error found by the driver's decoder.
    pub fn handle_codec_error(&mut self, now: Now, err: &CodecError, params: &Params, out: &mut Vec<Action>) {
        self.fail(now, err.code(), err.to_string(), params, out);
    }

    /// The shard registered the login: the session becomes Active and
    /// answers with `AuthOk`.
    pub fn activate(&mut self, now: Now, login: &Login, ok: proto::AuthOk, params: &Params, out: &mut Vec<Action>) {
        if self.phase() != Phase::Authenticated {
            return;
        }
        let heartbeat = login.heartbeat_ms;
        let idle_timeout_ms = heartbeat.saturating_mul(params.idle_timeout_factor).min(IDLE_MASK);
        self.packed = idle_timeout_ms;
        self.set_phase(Phase::Active);
        self.touch(now.mono);
        out.push(Action::Send(Frame::AuthOk(proto::AuthOk {
            heartbeat_min_ms: params.heartbeat_min_ms,
            heartbeat_max_ms: params.heartbeat_max_ms,
            heartbeat_ms: heartbeat,
            idle_timeout_ms,
            server_time_ms: u64::try_from(now.unix_ms).unwrap_or(0),
            token_expires_ms: expires_ms(login.expires_at),
            ..ok
        })));
    }

    /// The shard matched a `Refresh` to this session's user and device:
    /// the token's expiry moves, and the client gets `RefreshOk`.
    pub fn refreshed(&mut self, now: Now, expires_at: i64, params: &Params, out: &mut Vec<Action>) {
        if self.phase() != Phase::Active {
            return;
        }
        self.expires_s = expiry_secs(now, expires_at, params);
        out.push(Action::Send(Frame::RefreshOk(proto::RefreshOk { token_expires_ms: expires_ms(expires_at) })));
    }

    /// Checks the deadline; call when the timer wheel says it may be due.
    pub fn handle_timeout(&mut self, now: Now, params: &Params, out: &mut Vec<Action>) {
        if now.mono < self.deadline() {
            return;
        }
        match self.phase() {
            Phase::Handshaking => self.fail(now, ErrorCode::AuthTimeout, String::new(), params, out),
            Phase::Active if now.mono >= self.expiry() => {
                let why = "the token expired during the session; send Refresh before AuthOk.token_expires_ms";
                self.fail(now, ErrorCode::TokenExpired, why.into(), params, out)
            }
            Phase::Active => self.fail(now, ErrorCode::IdleTimeout, String::new(), params, out),
            // A shard that never activates is a bug elsewhere; do not leak the
            // connection because of it.
            Phase::Authenticated => self.fail(now, ErrorCode::ServerError, String::new(), params, out),
            Phase::Closing => self.set_phase(Phase::Closed),
            Phase::Closed => {}
        }
    }

    /// Ends the session from the server side with an `Error` frame.
    pub fn close(&mut self, now: Now, code: ErrorCode, reason: String, params: &Params, out: &mut Vec<Action>) {
        self.fail(now, code, reason, params, out);
    }

    /// Ends the session with a `Kicked` frame (replaced login, backend kick).
    pub fn kick(&mut self, now: Now, code: ErrorCode, reason: String, params: &Params, out: &mut Vec<Action>) {
        if !self.begin_close(now, params) {
            return;
        }
        let reason = if reason.is_empty() { codes::info(code).summary.to_owned() } else { reason };
        out.push(Action::Send(Frame::Kicked(proto::Kicked { code: code as i32, reason })));
        out.push(Action::Close(code));
    }

    /// The peer went away or the socket failed: nothing more to send.
    pub fn closed_by_peer(&mut self) {
        self.set_phase(Phase::Closed);
    }

    /// A frame arrived: the idle deadline moves, and the control budget
    /// leaks for the time since the previous frame (the old deadline minus
    /// the idle timeout).
    fn touch(&mut self, now: Millis) {
        let idle = u64::from(self.idle_timeout_ms());
        let last = self.phase_deadline().0.saturating_sub(idle);
        self.set_control_level(self.control_level().saturating_sub(now.0.saturating_sub(last)));
        self.set_deadline(now.add_ms(idle));
    }

    fn begin_close(&mut self, now: Now, params: &Params) -> bool {
        if matches!(self.phase(), Phase::Closing | Phase::Closed) {
            return false;
        }
        self.set_phase(Phase::Closing);
        self.set_deadline(now.mono.add_ms(params.close_linger_ms));
        true
    }

    fn fail(&mut self, now: Now, code: ErrorCode, reason: String, params: &Params, out: &mut Vec<Action>) {
        if !self.begin_close(now, params) {
            return;
        }
        out.push(Action::Send(Frame::Error(codes::error_body(code, reason))));
        out.push(Action::Close(code));
    }

    fn on_auth(&mut self, now: Now, auth: proto::Auth, params: &Params, out: &mut Vec<Action>) {
        let claims = match params.keyring.verify(&auth.token, now.unix_secs(), params.clock_leeway_secs) {
            Ok(claims) => claims,
            Err(err) => return self.reject_token(now, &err, params, out),
        };
        if !auth.device.is_empty() && auth.device != claims.device {
            return self.fail(
                now,
                ErrorCode::InvalidToken,
                "Auth.device differs from the token's device".into(),
                params,
                out,
            );
        }
        let fields = [&claims.user, &claims.device, &claims.app, &auth.platform, &auth.client_version];
        if !fields.iter().all(|f| fits_field(f, params.max_id_bytes)) {
            return self.fail(
                now,
                ErrorCode::BadFrame,
                format!("ids must be at most {} bytes of printable characters", params.max_id_bytes),
                params,
                out,
            );
        }
        let groups_ok = claims.groups.len() <= crate::groups::MAX_GROUP_CLAIMS
            && claims.groups.iter().all(|g| !g.is_empty() && fits_field(g, params.max_id_bytes));
        if !groups_ok {
            let why = format!(
                "the token's groups claim must list at most {} printable names of 1 to {} bytes",
                crate::groups::MAX_GROUP_CLAIMS,
                params.max_id_bytes
            );
            return self.fail(now, ErrorCode::InvalidToken, why, params, out);
        }
        self.set_phase(Phase::Authenticated);
        self.expires_s = expiry_secs(now, claims.expires_at, params);
        // The client has done its part; registration (a hand-off, the user
        // directory) gets a fresh deadline of its own.
        self.set_deadline(now.mono.add_ms(params.auth_timeout_ms));
        out.push(Action::Authenticated(Box::new(Login {
            user: claims.user,
            device: claims.device,
            app: claims.app,
            platform: auth.platform,
            client_version: auth.client_version,
            capabilities: auth.capabilities,
            last_seq: auth.last_seq,
            heartbeat_ms: params.negotiate_heartbeat(auth.heartbeat_ms),
            store_incarnation: auth.store_incarnation,
            groups: claims.groups,
            expires_at: claims.expires_at,
            issued_at: claims.issued_at,
        })));
    }

    fn reject_token(&mut self, now: Now, err: &TokenError, params: &Params, out: &mut Vec<Action>) {
        self.fail(now, err.code(), err.to_string(), params, out);
    }
}

/// The monotonic second (rounded up) at which a token expiring at
/// `expires_at` (unix seconds) is past the clock leeway.
fn expiry_secs(now: Now, expires_at: i64, params: &Params) -> u32 {
    let until_ms = expires_at
        .saturating_add(i64::from(params.clock_leeway_secs))
        .saturating_mul(1000)
        .saturating_sub(now.unix_ms)
        .max(0);
    mono_secs(now.mono.0.saturating_add(u64::try_from(until_ms).unwrap_or(0)))
}

/// A monotonic ms instant as `expires_s`: whole seconds rounded up, never
/// [`NEVER`] (that means no expiry).
fn mono_secs(at_ms: u64) -> u32 {
    u32::try_from(at_ms.div_ceil(1000)).unwrap_or(NEVER - 1).min(NEVER - 1)
}

/// Unix seconds as the unix ms of AuthOk and RefreshOk.
fn expires_ms(expires_at: i64) -> u64 {
    u64::try_from(expires_at.saturating_mul(1000)).unwrap_or(0)
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
