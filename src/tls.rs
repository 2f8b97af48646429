//! TLS material and configuration: `gen-cert` (a CA and a server certificate
//! signed by it, with rcgen), and the rustls configs of both ends. TLS 1.3
//! only, ALPN `ftpx/1` required on both sides, no early data.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::protocol::ALPN;

pub const CA_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const CERT_FILE: &str = "server.pem";
pub const KEY_FILE: &str = "server.key";

/// Host names and addresses a certificate is for when none are asked for.
pub fn default_hosts() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

/// Whether `dir` holds a server certificate and key.
pub fn has_server_cert(dir: &Path) -> bool {
    dir.join(CERT_FILE).exists() && dir.join(KEY_FILE).exists()
}

/// Makes a CA and a server certificate for `hosts` in `dir`. Refuses to
/// overwrite any existing file unless `force`.
pub fn gen_cert(dir: &Path, hosts: &[String], force: bool) -> Result<Vec<PathBuf>, String> {
    if hosts.is_empty() {
        return Err("at least one --host is needed".into());
    }
    let files = [CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE].map(|f| dir.join(f));
    if !force && let Some(existing) = files.iter().find(|p| p.exists()) {
        return Err(format!(
            "{} exists; use --force to replace it",
            existing.display()
        ));
    }
    let err = |e: rcgen::Error| format!("cannot make certificate: {e}");

    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ftpx CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    ca_params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    for host in hosts {
        if host.parse::<IpAddr>().is_err()
            && rustls::pki_types::DnsName::try_from(host.as_str()).is_err()
        {
            return Err(format!("{host:?} is neither a host name nor an IP address"));
        }
    }
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, hosts[0].clone());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let cert = params.signed_by(&key, &issuer).map_err(err)?;

    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    write_file(&files[0], ca_cert.pem().as_bytes(), 0o644)?;
    write_file(&files[1], ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files[2], cert.pem().as_bytes(), 0o644)?;
    write_file(&files[3], key.serialize_pem().as_bytes(), 0o600)?;
    Ok(files.to_vec())
}

/// Writes a whole file with `mode`, replacing it atomically.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server's rustls config from `dir/server.pem` and `dir/server.key`.
pub fn server_config(dir: &Path) -> Result<rustls::ServerConfig, String> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificate {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("cannot read key {}: {e}", key_path.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not fit together: {e}"))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT data could be replayed; ftpx never accepts it.
    config.max_early_data_size = 0;
    Ok(config)
}

/// The client's rustls config, trusting only the CA in `ca_file`.
pub fn client_config(ca_file: &Path) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read CA file {}: {e}", ca_file.display()))?;
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("bad CA certificate in {}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no CA certificate", ca_file.display()));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// How the client decides to trust a server.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The certificate must chain to the CA in this file and match the host name.
    Ca(PathBuf),
    /// Trust on first use: the certificate's fingerprint is pinned in this
    /// known-hosts file at the first contact, and must not change after.
    Pinned(PathBuf),
}

/// A certificate's fingerprint: `blake3:` and the BLAKE3 of its DER bytes.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    format!("blake3:{}", blake3::hash(cert.as_ref()).to_hex())
}

/// The fingerprint pinned for `host_port` in a known-hosts file
/// (lines of `HOST:PORT FINGERPRINT`; `#` starts a comment).
pub fn pinned_fingerprint(known_hosts: &Path, host_port: &str) -> Result<Option<String>, String> {
    let text = match fs::read_to_string(known_hosts) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", known_hosts.display())),
    };
    Ok(text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(h), Some(fp)) if h == host_port && !h.starts_with('#') => Some(fp.to_string()),
            _ => None,
        }
    }))
}

/// Adds a pin to a known-hosts file.
pub fn pin(known_hosts: &Path, host_port: &str, fingerprint: &str) -> Result<(), String> {
    if let Some(dir) = known_hosts.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(known_hosts)
        .map_err(|e| format!("cannot write {}: {e}", known_hosts.display()))?;
    writeln!(f, "{host_port} {fingerprint}")
        .map_err(|e| format!("cannot write {}: {e}", known_hosts.display()))
}

/// Checks the server's certificate against a pin instead of a CA. The
/// handshake signature is still verified, so only the holder of the pinned
/// certificate's key can pass.
#[derive(Debug)]
pub struct PinVerifier {
    pinned: Option<String>,
    host_port: String,
    known_hosts: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The fingerprint the server presented, for the caller to pin after the handshake.
    pub presented: std::sync::Mutex<Option<String>>,
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if let Some(pinned) = &self.pinned
            && *pinned != fp
        {
            return Err(rustls::Error::General(format!(
                "THE SERVER'S CERTIFICATE FOR {} HAS CHANGED: pinned {pinned}, presented {fp}. \
                     Someone may be intercepting the connection. If the change is expected, \
                     remove the line for {} from {}",
                self.host_port,
                self.host_port,
                self.known_hosts.display()
            )));
        }
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp);
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config that trusts by pin (see [`Trust::Pinned`]).
pub fn pinned_client_config(
    known_hosts: &Path,
    host_port: &str,
) -> Result<(rustls::ClientConfig, Arc<PinVerifier>), String> {
    let provider = provider();
    let verifier = Arc::new(PinVerifier {
        pinned: pinned_fingerprint(known_hosts, host_port)?,
        host_port: host_port.to_string(),
        known_hosts: known_hosts.to_path_buf(),
        provider: provider.clone(),
        presented: std::sync::Mutex::new(None),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok((config, verifier))
}

/// The name the client checks the server's certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a valid host name or address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn gen_cert_writes_private_keys_for_the_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        gen_cert(dir.path(), &default_hosts(), false).unwrap();
        for (f, mode) in [
            (CA_FILE, 0o644),
            (CA_KEY_FILE, 0o600),
            (CERT_FILE, 0o644),
            (KEY_FILE, 0o600),
        ] {
            let m = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(m, mode, "{f}");
        }
        assert!(
            gen_cert(dir.path(), &default_hosts(), false)
                .unwrap_err()
                .contains("--force")
        );
        gen_cert(dir.path(), &["files.example".into()], true).unwrap();
        let config = server_config(dir.path()).unwrap();
        assert_eq!(config.max_early_data_size, 0);
        assert_eq!(config.alpn_protocols, vec![ALPN.to_vec()]);
        client_config(&dir.path().join(CA_FILE)).unwrap();
        assert!(gen_cert(dir.path(), &["bad host!".into()], true).is_err());
    }
}
