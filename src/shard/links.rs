//! WebSocket and TLS connections on a shard: the upgrade and the WebSocket
//! frames of each read, TLS records decrypted in place and sealed on the
//! way out (the transports themselves are in `conn::ws` and `conn::tls`).
//! Socket helpers of the connection driver (`driver.rs`), over the shard.

use super::*;

/// The bytes of one read on a WebSocket connection: the upgrade's
/// request head until it is answered, then frames, unmasked in place in
/// the scratch buffer and handed to framing like TCP bytes. `Err` closes
/// the connection now (after a best-effort write of what is queued: the
/// HTTP error or the Close frame).
pub(super) fn on_ws_read(shard: &Shard, key: ConnKey, buf: &mut [u8], draining: bool) -> Result<(), ()> {
    let max = ws::decode::max_message_bytes(shard.cfg.max_frame_bytes);
    let mut guard = shard.state.borrow_mut();
    let Some(conn) = guard.conn(key) else { return Err(()) };
    let mut state = conn.io().ws.take().unwrap_or_default();
    let mut start = 0;
    if let Some(head) = state.upgrade.as_mut() {
        let parsed = match head.feed(buf) {
            Ok(ws::handshake::Feed::Incomplete) => {
                conn.io().ws = Some(state);
                return Ok(());
            }
            Ok(ws::handshake::Feed::Complete { consumed }) => {
                start = consumed;
                ws::handshake::parse_request(head.head(), &shard.cfg.ws)
            }
            Err(err) => Err(err),
        };
        state.upgrade = None;
        match parsed {
            Ok(accepted) => {
                conn.link = conn.link.upgraded();
                conn.io().out.push(Bytes::from(accepted.response()));
                state.token = accepted.token;
            }
            Err(err) => {
                debug!(shard = %shard.id, error = %err, "WebSocket upgrade refused");
                let io = conn.io.get_or_insert_with(Box::default);
                io.out.push(Bytes::from(err.response()));
                // Over TLS the caller seals and writes it.
                if !conn.link.is_tls() {
                    let _ = io.out.write_now(conn.fd.get());
                }
                return Err(());
            }
        }
    }
    let data = &mut buf[start..];
    let (data_len, close) = match state.decoder.decode(data, max) {
        Ok(out) => {
            if let Some(ping) = out.pong {
                // One pong per read at most (the decoder keeps the last
                // ping), and none past the queue's bound.
                let io = conn.io();
                if io.out.bytes() < shard.cfg.outbound_queue_bytes as usize {
                    io.out.push(ws::encode::encode_pong(ping.as_bytes()));
                }
            }
            (out.data_len, out.close.map(|c| c.reply()))
        }
        Err(err) => {
            debug!(shard = %shard.id, error = %err, "WebSocket protocol error");
            (0, Some(ws::encode::encode_close(err.close_code(), &err.to_string())))
        }
    };
    if !state.is_idle() || close.is_some() {
        conn.io().ws = Some(state);
    }
    conn.wake();
    if data_len > 0 && !draining {
        drop(guard);
        shard.on_bytes(key, &data[..data_len]);
        guard = shard.state.borrow_mut();
    }
    let Some(close) = close else { return Ok(()) };
    // The peer closed or broke the protocol: our Close goes after what
    // is queued, as far as the socket takes it now; then the socket
    // closes.
    if let Some(conn) = guard.conn(key) {
        let io = conn.io.get_or_insert_with(Box::default);
        io.out.push(close);
        if !conn.link.is_tls() {
            let _ = io.out.write_now(conn.fd.get());
        }
    }
    Err(())
}

/// The bytes of one read on a TLS connection: records decrypted in
/// place (after any incomplete record kept from the last read), the
/// plaintext handed to framing (or, for wss, to the WebSocket side).
/// What rustls answers (handshake, alerts) is queued as sealed. `Err`
/// closes the connection now, after a best-effort write of what is
/// queued.
pub(super) fn on_tls_read(
    shard: &Shard,
    key: ConnKey,
    t: &mut TlsLink,
    buf: &mut [u8],
    draining: bool,
) -> Result<(), ()> {
    let mut carried = t.tail.take().map(Vec::from).unwrap_or_default();
    let input: &mut [u8] = if carried.is_empty() {
        buf
    } else {
        carried.extend_from_slice(buf);
        &mut carried
    };
    let mut plain = std::mem::take(&mut *shard.plain_scratch.borrow_mut());
    plain.clear();
    let mut out = Vec::new();
    let mut peer_closed = false;
    let read = t.session.read(input, &mut out, &mut |p| plain.extend_from_slice(p));
    if !out.is_empty() {
        t.cipher.push(Bytes::from(out));
    }
    let mut result = match read {
        Ok(progress) => {
            let rest = &input[progress.consumed.min(input.len())..];
            if t.session.is_handshaking() && rest.len() > MAX_TLS_HANDSHAKE_TAIL {
                debug!(shard = %shard.id, carried = rest.len(), "TLS handshake message too large");
                Err(())
            } else {
                t.tail = (!rest.is_empty()).then(|| rest.into());
                // Input after close_notify is never read (review
                // finding 2): the connection ends here, with our
                // close_notify after what is queued (RFC 8446 6.1).
                peer_closed = progress.peer_closed;
                if progress.peer_closed { Err(()) } else { Ok(()) }
            }
        }
        Err(err) => {
            debug!(shard = %shard.id, error = %err, "TLS failed");
            Err(())
        }
    };
    let link = shard.state.borrow().conn_ref(key).map(|c| c.link);
    if !plain.is_empty() {
        match link.map(Link::form) {
            Some(Link::Plain) if !draining => shard.on_bytes(key, &plain),
            Some(Link::WsUpgrade | Link::Ws) if on_ws_read(shard, key, &mut plain, draining).is_err() => {
                result = Err(());
            }
            _ => {}
        }
    }
    if plain.capacity() <= shard.cfg.read_buffer_bytes * 2 {
        *shard.plain_scratch.borrow_mut() = plain;
    }
    if result.is_err() {
        // The alert, an HTTP error or a Close frame: as far as the socket
        // takes it now.
        let mut st = shard.state.borrow_mut();
        if let Some(conn) = st.conn(key) {
            if let Some(io) = conn.io.as_mut() {
                let _ = t.seal(&mut io.out);
            }
            if peer_closed && !t.sent_close {
                let mut out = Vec::new();
                if t.session.close_notify(&mut out).is_ok() {
                    t.cipher.push(Bytes::from(out));
                }
                t.sent_close = true;
            }
            let _ = t.cipher.write_now(conn.fd.get());
        }
    }
    t.release_idle();
    result
}

/// The server session for a connection accepted on a TLS listener, with
/// the certificate in force now.
pub(super) fn tls_session(shard: &Shard, link: Link) -> Option<crate::conn::tls::ServerTls> {
    let mut handles = shard.tls_configs.borrow_mut();
    let handle = match link {
        Link::Tls => handles.0.as_mut(),
        _ => handles.1.as_mut(),
    }?;
    match crate::conn::tls::ServerTls::server(handle.current().clone()) {
        Ok(session) => Some(session),
        Err(err) => {
            warn!(shard = %shard.id, error = %err, "cannot start a TLS session");
            None
        }
    }
}

/// Writes a TLS connection's sealed records, then seals what was queued
/// since and writes that: `Ok(true)` when both are empty, `Ok(false)` when
/// the socket is full (write readiness is armed).
pub(super) fn flush_tls(
    t: &mut TlsLink,
    plain: &mut OutQueue,
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
) -> std::io::Result<bool> {
    loop {
        if !t.cipher.flush(stream, cx)? {
            return Ok(false);
        }
        if plain.is_empty() || t.session.is_handshaking() || t.sent_close {
            t.release_idle();
            return Ok(true);
        }
        t.seal(plain).map_err(std::io::Error::other)?;
    }
}

/// An Auth frame without a token takes the one of the WebSocket handshake
/// (browsers cannot set headers); it is checked like any other. The
/// handshake token is dropped at the first Auth either way.
pub(super) fn handshake_token(conn: &mut Conn, auth: &mut proto::Auth) {
    let Some(token) = conn.io.as_mut().and_then(|io| io.ws.as_mut()).and_then(|ws| ws.token.take()) else { return };
    if auth.token.is_empty() {
        auth.token = token.expose().to_owned();
    }
}
