//! Opening a session: TCP, then TLS with the `ftpx/1` ALPN, the server's
//! certificate checked against a CA or, with trust on first use, against
//! the fingerprint pinned at the first contact.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::info;

use super::{ClientError, Result};
use crate::protocol;
use crate::tls::Trust;

/// A TLS session to `host:port` that the server's certificate proved, and
/// the address as known_hosts records it.
pub(super) async fn tls_session(
    host: &str,
    port: u16,
    trust: &Trust,
    io_timeout: Duration,
) -> Result<(TlsStream<TcpStream>, String)> {
    let name = crate::tls::server_name(host).map_err(ClientError::Setup)?;
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let (tls, pin) = match trust {
        Trust::Ca(ca_file) => (
            crate::tls::client_config(ca_file).map_err(ClientError::Setup)?,
            None,
        ),
        Trust::Pinned(known_hosts) => {
            let (config, verifier) =
                crate::tls::pinned_client_config(known_hosts, &addr).map_err(ClientError::Setup)?;
            let first = crate::tls::pinned_fingerprint(known_hosts, &addr)
                .map_err(ClientError::Setup)?
                .is_none();
            (config, first.then_some((verifier, known_hosts)))
        }
    };
    let tcp = tokio::time::timeout(io_timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| ClientError::Connect {
            addr: addr.clone(),
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| ClientError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(
        io_timeout,
        TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .map_err(|_| ClientError::Tls {
        addr: addr.clone(),
        source: std::io::ErrorKind::TimedOut.into(),
    })?
    .map_err(|source| ClientError::Tls {
        addr: addr.clone(),
        source,
    })?;
    if stream.get_ref().1.alpn_protocol() != Some(protocol::ALPN) {
        return Err(ClientError::Protocol(
            "server did not agree to the ftpx protocol (ALPN)".into(),
        ));
    }
    if let Some((verifier, known_hosts)) = pin {
        // First contact, and the server proved it holds the key: pin it.
        let presented = verifier
            .presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(fp) = presented {
            crate::tls::pin(known_hosts, &addr, &fp).map_err(ClientError::Setup)?;
            eprintln!(
                "ftpx: first contact with {addr}; pinned its certificate {fp} in {}",
                known_hosts.display()
            );
            info!(server = %addr, fingerprint = %fp, "pinned server certificate");
        }
    }
    Ok((stream, addr))
}
