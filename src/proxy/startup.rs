//! The client's startup phase and the relayed authentication exchange.
//!
//! Before the first StartupMessage a client may ask for TLS (SSLRequest), GSS encryption
//! (GSSENCRequest, always refused) or send a CancelRequest instead. Once keyshift has the
//! StartupMessage it connects upstream, forwards the packet unchanged and relays the auth
//! exchange message by message, so every method PostgreSQL supports (trust, password, md5,
//! SCRAM-SHA-256) works without keyshift knowing any password. Two messages are changed on
//! the way: the SASL mechanism list loses `SCRAM-SHA-256-PLUS` (channel binding cannot cross
//! a TLS-terminating proxy), and BackendKeyData carries keyshift's own cancel key.

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::cancel::{CancelKey, CancelMap, UpstreamKey};
use super::messages::{self, sqlstate};
use super::stream::Stream;
use super::wire::startup::{self as frame, FrameError, PROTOCOL_3_0, StartupRequest};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("client: {0}")]
    Client(FrameError),
    #[error("server: {0}")]
    Server(FrameError),
    #[error("client TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client sent a second SSLRequest or GSSENCRequest after encryption was set up")]
    DoubleEncryption,
    #[error("unsupported frontend protocol {major}.{minor}")]
    Protocol { major: u16, minor: u16 },
    #[error(
        "client sent message type 0x{0:02x} during authentication, expected a password message"
    )]
    UnexpectedAuthMessage(u8),
    #[error("PostgreSQL did not answer the startup message within {0:?} (connect_timeout)")]
    NoAnswer(std::time::Duration),
    #[error("client did not complete its startup within startup_timeout")]
    Timeout,
    #[error("authentication failed or was refused by PostgreSQL")]
    Refused,
}

/// What the client asked for.
pub enum Request {
    /// A session: the stream (TLS or not) and the StartupMessage, unchanged.
    Session { stream: Stream, packet: BytesMut },
    /// A CancelRequest for the session holding this key.
    Cancel { pid: u32, secret: u32 },
}

/// Reads the client's startup-phase packets until it asks for a session or a cancel.
/// A client that sends garbage or is too slow gets a FATAL 08P01 where the protocol allows.
pub async fn negotiate(
    tcp: TcpStream,
    acceptor: Option<&TlsAcceptor>,
    deadline: tokio::time::Instant,
) -> Result<Request, StartupError> {
    let mut stream = Stream::Plain(tcp);
    loop {
        let pkt = match tokio::time::timeout_at(deadline, frame::read_startup(&mut stream)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                if !matches!(e, FrameError::Closed | FrameError::Io(_)) {
                    let msg = format!("invalid startup packet: {e}");
                    let _ = send(
                        &mut stream,
                        &messages::fatal(sqlstate::PROTOCOL_VIOLATION, &msg),
                    )
                    .await;
                }
                return Err(StartupError::Client(e));
            }
            Err(_) => {
                let msg = "client did not complete its startup in time (startup_timeout)";
                let _ = send(
                    &mut stream,
                    &messages::fatal(sqlstate::PROTOCOL_VIOLATION, msg),
                )
                .await;
                return Err(StartupError::Timeout);
            }
        };
        let request = match frame::startup_request(&pkt) {
            Ok(r) => r,
            Err(e) => return Err(StartupError::Client(e)),
        };
        match request {
            StartupRequest::Ssl | StartupRequest::GssEnc => {
                if stream.is_tls() {
                    return Err(StartupError::DoubleEncryption);
                }
                match (request, acceptor, stream) {
                    (StartupRequest::Ssl, Some(acc), Stream::Plain(mut tcp)) => {
                        tcp.write_all(b"S")
                            .await
                            .map_err(|e| StartupError::Client(e.into()))?;
                        let tls = tokio::time::timeout_at(deadline, acc.accept(tcp))
                            .await
                            .map_err(|_| StartupError::Timeout)?
                            .map_err(StartupError::Tls)?;
                        stream = Stream::ServerTls(Box::new(tls));
                    }
                    (_, _, mut s) => {
                        s.write_all(b"N")
                            .await
                            .map_err(|e| StartupError::Client(e.into()))?;
                        stream = s;
                    }
                }
            }
            StartupRequest::Cancel { pid, secret } => {
                return Ok(Request::Cancel { pid, secret });
            }
            StartupRequest::Startup(PROTOCOL_3_0) => {
                return Ok(Request::Session {
                    stream,
                    packet: pkt,
                });
            }
            StartupRequest::Startup(other) => {
                let err = StartupError::Protocol {
                    major: (other >> 16) as u16,
                    minor: (other & 0xffff) as u16,
                };
                let msg = format!("{err}: keyshift supports protocol 3.0");
                let code = if other >> 16 == 3 {
                    sqlstate::FEATURE_NOT_SUPPORTED
                } else {
                    sqlstate::PROTOCOL_VIOLATION
                };
                let _ = send(&mut stream, &messages::fatal(code, &msg)).await;
                return Err(err);
            }
        }
    }
}

/// Where the auth relay ends: the upstream key registered for cancels, the client-facing key,
/// and the transaction status of the first ReadyForQuery.
pub struct Authenticated {
    pub upstream_key: Option<UpstreamKey>,
    /// Removed from the cancel map when dropped.
    pub client_key: Option<CancelKey>,
    pub status: u8,
}

/// Forwards the startup packet and relays authentication until the first ReadyForQuery.
/// On an error from PostgreSQL (bad password, unknown database) the client has received
/// PostgreSQL's own ErrorResponse before this returns `Refused`.
pub async fn authenticate(
    client: &mut Stream,
    server: &mut Stream,
    packet: &[u8],
    cancels: &Arc<CancelMap>,
    max_message: usize,
    first_reply: std::time::Duration,
) -> Result<Authenticated, StartupError> {
    send(server, packet).await.map_err(StartupError::Server)?;
    let mut smsg = BytesMut::with_capacity(256);
    let mut cmsg = BytesMut::with_capacity(256);
    let mut out = Authenticated {
        upstream_key: None,
        client_key: None,
        status: b'I',
    };
    let mut first = true;
    loop {
        let read = frame::read_message(server, &mut smsg, max_message);
        let tag = if first {
            // A server that accepts connections but never answers must not hang the client.
            first = false;
            tokio::time::timeout(first_reply, read)
                .await
                .map_err(|_| StartupError::NoAnswer(first_reply))?
        } else {
            read.await
        }
        .map_err(StartupError::Server)?;
        match tag {
            b'R' => {
                let code = frame::authentication_code(&smsg).map_err(StartupError::Server)?;
                match code {
                    0 => send(client, &smsg).await.map_err(StartupError::Client)?,
                    10 => {
                        let stripped = strip_scram_plus(&smsg).ok_or(StartupError::Server(
                            FrameError::Malformed("AuthenticationSASL"),
                        ))?;
                        send(client, &stripped)
                            .await
                            .map_err(StartupError::Client)?;
                    }
                    _ => send(client, &smsg).await.map_err(StartupError::Client)?,
                }
                // Everything but Ok and SASLFinal expects the client to answer.
                if code != 0 && code != 12 {
                    let ctag = frame::read_message(client, &mut cmsg, max_message)
                        .await
                        .map_err(StartupError::Client)?;
                    if ctag != b'p' {
                        return Err(StartupError::UnexpectedAuthMessage(ctag));
                    }
                    send(server, &cmsg).await.map_err(StartupError::Server)?;
                }
            }
            b'K' => {
                let (pid, secret) = frame::backend_key_data(&smsg).map_err(StartupError::Server)?;
                let up = UpstreamKey { pid, secret };
                let guard = cancels.register_guarded(up);
                let key = guard.key();
                out.upstream_key = Some(up);
                out.client_key = Some(guard);
                send(
                    client,
                    &messages::backend_key_data(key.0 as i32, key.1 as i32),
                )
                .await
                .map_err(StartupError::Client)?;
            }
            b'Z' => {
                out.status = super::wire::backend::ready_for_query(&smsg)
                    .map_err(|_| StartupError::Server(FrameError::Malformed("ReadyForQuery")))?
                    .byte();
                send(client, &smsg).await.map_err(StartupError::Client)?;
                return Ok(out);
            }
            b'E' => {
                let _ = send(client, &smsg).await;
                return Err(StartupError::Refused);
            }
            _ => send(client, &smsg).await.map_err(StartupError::Client)?,
        }
    }
}

/// Rebuilds AuthenticationSASL without `SCRAM-SHA-256-PLUS`. `None` if malformed.
fn strip_scram_plus(msg: &[u8]) -> Option<BytesMut> {
    let mechs = frame::sasl_mechanisms(msg).ok()?;
    let kept: Vec<&[u8]> = mechs
        .into_iter()
        .filter(|m| *m != b"SCRAM-SHA-256-PLUS")
        .collect();
    Some(frame::build_authentication_sasl(&kept))
}

pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), FrameError> {
    w.write_all(bytes).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_plus() {
        let mut m = vec![b'R', 0, 0, 0, 0, 0, 0, 0, 10];
        m.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let len = (m.len() - 1) as u32;
        m[1..5].copy_from_slice(&len.to_be_bytes());
        let out = strip_scram_plus(&m).unwrap();
        let mut want = vec![b'R', 0, 0, 0, 23, 0, 0, 0, 10];
        want.extend_from_slice(b"SCRAM-SHA-256\0\0");
        assert_eq!(&out[..], &want[..]);
        assert!(strip_scram_plus(&m[..12]).is_none());
    }
}
