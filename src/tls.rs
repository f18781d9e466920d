//! TLS for every connection to blue and green, with libpq's `sslmode` semantics, on rustls.
//!
//! A DSN's `sslmode`, `sslrootcert`, `sslcert`, `sslkey` and `sslcrl` become one [`Settings`],
//! read and checked whenever the DSN is parsed (files included: when the config is validated,
//! and again as each session or command resolves its DSNs), so a typo or an unreadable file is
//! refused before anything connects. The SQL connections (tokio-postgres) get the rustls
//! `ClientConfig` built then; the replication connection (pgwire-replication) gets the same
//! settings as its own `TlsConfig`, whose files that library reads on each connect.
//!
//! Invariants:
//! - The modes mean what they mean in libpq: `disable` never tries TLS; `allow` tries plaintext
//!   first and TLS if the server refuses it; `prefer` (the default) tries TLS first and
//!   plaintext if that fails; `require` insists on TLS without checking the certificate, unless
//!   a root certificate is given, which makes it `verify-ca` (libpq's rule); `verify-ca` checks
//!   the chain; `verify-full` checks the chain and the host name (or IP address). A Unix socket
//!   never uses TLS, as in libpq.
//! - A certificate that fails a check is a permanent error naming the check and what to set;
//!   it is never retried and never silently downgraded (only `allow` and `prefer` fall back,
//!   and they check nothing to begin with).
//! - Nothing secret is kept here: paths, not key material, appear in errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// How one connection attempt treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Plain,
    Tls,
}

/// What a TLS attempt checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

/// The trusted roots: a PEM file, or the operating system's store (`sslrootcert=system`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    System(PathBuf),
}

impl RootCert {
    pub fn path(&self) -> &Path {
        match self {
            RootCert::File(p) | RootCert::System(p) => p,
        }
    }
}

/// The TLS part of one DSN, files read and checked.
#[derive(Clone)]
pub struct Settings {
    pub mode: SslMode,
    pub root: Option<RootCert>,
    /// Client certificate and key (mutual TLS).
    pub client: Option<(PathBuf, PathBuf)>,
    pub crl: Option<PathBuf>,
    /// For SQL connections (tokio-postgres); `None` under `disable`.
    config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("mode", &self.mode)
            .field("root", &self.root)
            .field("client", &self.client)
            .field("crl", &self.crl)
            .finish()
    }
}

/// What the DSN said, before the files are read.
#[derive(Debug, Clone, Default)]
pub struct Requested {
    pub mode: SslMode,
    pub rootcert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub crl: Option<String>,
}

/// A TLS setting that cannot work: the DSN key and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub key: &'static str,
    pub message: String,
}

fn setting(key: &'static str, message: impl Into<String>) -> SettingError {
    SettingError {
        key,
        message: message.into(),
    }
}

/// Where the OS keeps its trusted roots as one PEM bundle (what OpenSSL, hence libpq's
/// `sslrootcert=system`, reads): `SSL_CERT_FILE` first, then the distributions' paths.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn system_bundle() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SSL_CERT_FILE") {
        return Some(PathBuf::from(p));
    }
    SYSTEM_BUNDLES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// libpq's default files, in `~/.postgresql/`.
fn default_file(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql").join(name);
    path.is_file().then_some(path)
}

impl Requested {
    /// Reads and checks the files, as libpq would before connecting. `unix`: the DSN points at
    /// a socket directory, where TLS is never used (nothing is read).
    pub fn resolve(self, unix: bool) -> Result<Settings, SettingError> {
        if unix || self.mode == SslMode::Disable {
            return Ok(Settings::plain(self.mode));
        }
        let root = match self.rootcert.as_deref() {
            Some("system") => Some(RootCert::System(system_bundle().ok_or_else(|| {
                setting(
                    "sslrootcert",
                    "`system`: no trust store found (set SSL_CERT_FILE to the CA bundle, \
                     or install ca-certificates)",
                )
            })?)),
            Some(path) => Some(RootCert::File(PathBuf::from(path))),
            None => default_file("root.crt").map(RootCert::File),
        };
        let mut mode = self.mode;
        if mode == SslMode::Require && root.is_some() {
            // libpq: with a root certificate present, `require` behaves as `verify-ca`.
            mode = SslMode::VerifyCa;
        }
        let checks = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
        if checks && root.is_none() {
            return Err(setting(
                "sslrootcert",
                format!(
                    "sslmode={} needs the CA that signed the server's certificate: set \
                     sslrootcert to its PEM file (or `system` for the OS trust store, e.g. for a \
                     public CA), or use sslmode=require to skip the check",
                    mode.as_str()
                ),
            ));
        }
        let client = client_files(self.cert, self.key)?;
        let crl = self.crl.map(PathBuf::from);
        let mut settings = Settings {
            mode,
            root,
            client,
            crl,
            config: None,
        };
        settings.config = Some(Arc::new(settings.client_config()?));
        Ok(settings)
    }
}

fn client_files(
    cert: Option<String>,
    key: Option<String>,
) -> Result<Option<(PathBuf, PathBuf)>, SettingError> {
    let cert = cert
        .map(PathBuf::from)
        .or_else(|| default_file("postgresql.crt"));
    let key = key
        .map(PathBuf::from)
        .or_else(|| default_file("postgresql.key"));
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(setting(
            "sslkey",
            "sslcert is set but not sslkey: name the client certificate's private key",
        )),
        (None, Some(_)) => Err(setting(
            "sslcert",
            "sslkey is set but not sslcert: name the client certificate",
        )),
        (Some(c), Some(k)) => {
            check_key_permissions(&k)?;
            Ok(Some((c, k)))
        }
    }
}

/// libpq's rule: a private key readable by group or others is refused (0640 allowed when root
/// owns it), since anyone who can read it can log in as us.
fn check_key_permissions(path: &Path) -> Result<(), SettingError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| setting("sslkey", format!("cannot read {}: {e}", path.display())))?;
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(setting(
            "sslkey",
            format!(
                "private key file {} has group or world access (mode {mode:o}); it must be \
                 u=rw (0600) or less, or u=rw,g=r (0640) or less if owned by root: chmod 600 it",
                path.display()
            ),
        ));
    }
    Ok(())
}

impl Settings {
    /// Settings that never use TLS (`disable`, or a Unix socket).
    pub fn plain(mode: SslMode) -> Settings {
        Settings {
            mode,
            root: None,
            client: None,
            crl: None,
            config: None,
        }
    }

    /// The attempts a connection makes, in order (libpq's fallbacks).
    pub fn attempts(&self) -> &'static [Attempt] {
        if self.config.is_none() {
            return &[Attempt::Plain];
        }
        match self.mode {
            SslMode::Disable => &[Attempt::Plain],
            SslMode::Allow => &[Attempt::Plain, Attempt::Tls],
            SslMode::Prefer => &[Attempt::Tls, Attempt::Plain],
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[Attempt::Tls],
        }
    }

    pub fn check(&self) -> Check {
        match self.mode {
            SslMode::VerifyFull => Check::ChainAndName,
            SslMode::VerifyCa => Check::Chain,
            _ => Check::Nothing,
        }
    }

    /// The rustls configuration for SQL connections (`None` when TLS is never tried).
    pub fn rustls(&self) -> Option<Arc<ClientConfig>> {
        self.config.clone()
    }

    fn client_config(&self) -> Result<ClientConfig, SettingError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| setting("sslmode", format!("TLS setup: {e}")))?;
        let verifier = self.verifier(&provider)?;
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match &self.client {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = read_certs(cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    setting(
                        "sslkey",
                        format!(
                            "cannot read a private key from {}: {e} (PKCS#8, PKCS#1 or SEC1 PEM; \
                             encrypted keys are not supported: decrypt it with `openssl pkey`)",
                            key.display()
                        ),
                    )
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| setting("sslcert", format!("client certificate and key: {e}")))
            }
        }
    }

    fn verifier(
        &self,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ServerCertVerifier>, SettingError> {
        let Some(root) = &self.root else {
            return Ok(Arc::new(Unchecked(provider.clone())));
        };
        if self.check() == Check::Nothing {
            return Ok(Arc::new(Unchecked(provider.clone())));
        }
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(read_certs(root.path(), "sslrootcert")?);
        if added == 0 {
            return Err(setting(
                "sslrootcert",
                format!("no usable CA certificate in {}", root.path().display()),
            ));
        }
        let mut builder =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        if let Some(crl) = &self.crl {
            let crls = CertificateRevocationListDer::pem_file_iter(crl)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| setting("sslcrl", format!("cannot read {}: {e}", crl.display())))?;
            builder = builder.with_crls(crls);
        }
        let inner = builder
            .build()
            .map_err(|e| setting("sslrootcert", format!("{}: {e}", root.path().display())))?;
        Ok(match self.check() {
            Check::ChainAndName => inner,
            _ => Arc::new(ChainOnly(inner)),
        })
    }

    /// The same settings for the replication connection to `host`.
    pub fn replication(&self, attempt: Attempt, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::SslMode as Mode;
        let mode = match (attempt, self.check()) {
            (Attempt::Plain, _) => return pgwire_replication::TlsConfig::disabled(),
            (Attempt::Tls, Check::Nothing) => Mode::Require,
            (Attempt::Tls, Check::Chain) => Mode::VerifyCa,
            (Attempt::Tls, Check::ChainAndName) => Mode::VerifyFull,
        };
        pgwire_replication::TlsConfig {
            mode,
            ca_pem_path: self.root.as_ref().map(|r| r.path().to_path_buf()),
            // The name checked is always `host` (the connection may go to `hostaddr`), and
            // pgwire-replication refuses verify-full to an IP address unless it is given: an
            // address here is checked against the certificate's IP SANs, as libpq does.
            sni_hostname: Some(host.to_string()),
            client_cert_pem_path: self.client.as_ref().map(|c| c.0.clone()),
            client_key_pem_path: self.client.as_ref().map(|c| c.1.clone()),
        }
    }
}

fn read_certs(
    path: &Path,
    key: &'static str,
) -> Result<Vec<CertificateDer<'static>>, SettingError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| setting(key, format!("cannot read {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(setting(
            key,
            format!("no PEM certificate in {}", path.display()),
        ));
    }
    Ok(certs)
}

/// The one crypto provider: ring, as pgwire-replication installs for the replication
/// connection (so both connections negotiate the same way).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `require` and `prefer`: encryption without authentication of the server (libpq's meaning).
/// Handshake signatures are still verified, so the session is at least with the key holder.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the full chain check, then the name check's verdict ignored (webpki checks the
/// name last, so every other check has passed when it is the one that fails).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Why a TLS handshake failed, in the operator's terms (small: it travels in every failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server's certificate is not signed by a trusted CA.
    UnknownCa,
    /// The certificate does not name the host connected to.
    NameMismatch,
    Expired,
    NotYetValid,
    Revoked,
    /// The server refused our client certificate (or wanted one).
    ClientCertificate,
    Other,
}

impl Refusal {
    /// The refusal a failed TLS connection carries, if it is one, with what to tell the operator
    /// about the connection named by `field` (`blue.dsn`, ...): rustls' own error (wrapped in
    /// the I/O error the connector returns), found by type, never by message text.
    pub fn of(error: &(dyn std::error::Error + 'static), field: &str) -> Option<(Refusal, String)> {
        let mut next = Some(error);
        while let Some(e) = next {
            let found = e.downcast_ref::<rustls::Error>().or_else(|| {
                e.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
            });
            if let Some(r) = found {
                let refusal = Refusal::from_rustls(r);
                return Some((refusal, refusal.explain(r, field)));
            }
            next = e.source();
        }
        None
    }

    fn from_rustls(e: &rustls::Error) -> Refusal {
        use rustls::AlertDescription as A;
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => Refusal::UnknownCa,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Refusal::NameMismatch,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Refusal::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Refusal::NotYetValid
                }
                CertificateError::Revoked => Refusal::Revoked,
                _ => Refusal::Other,
            },
            rustls::Error::AlertReceived(
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateRequired
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::CertificateUnknown
                | A::AccessDenied,
            ) => Refusal::ClientCertificate,
            _ => Refusal::Other,
        }
    }

    fn explain(self, e: &rustls::Error, field: &str) -> String {
        match self {
            Refusal::UnknownCa => format!(
                "TLS: the server's certificate is not signed by a CA in {field}'s sslrootcert \
                 (unknown CA): set sslrootcert to the PEM file of the CA that signed it (your \
                 provider's bundle for a managed database), or `system` if a public CA signed it"
            ),
            Refusal::NameMismatch => format!(
                "TLS: the server's certificate is not valid for the host in {field} (hostname \
                 mismatch): connect with a host name the certificate names, or use \
                 sslmode=verify-ca to check the CA only"
            ),
            Refusal::Expired => "TLS: the server's certificate has expired: renew it on the \
                 server (or check this machine's clock)"
                .to_string(),
            Refusal::NotYetValid => "TLS: the server's certificate is not valid yet: check this \
                 machine's clock and the server's"
                .to_string(),
            Refusal::Revoked => format!(
                "TLS: the server's certificate is revoked by {field}'s sslcrl: the server needs a \
                 new certificate"
            ),
            Refusal::ClientCertificate => format!(
                "TLS: the server refused our client certificate ({e}): check {field}'s sslcert \
                 and sslkey, and that the server trusts their CA (ssl_ca_file)"
            ),
            Refusal::Other => format!("TLS: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_follow_libpq() {
        let with = |mode| {
            Requested {
                mode,
                ..Default::default()
            }
            .resolve(false)
            .map(|s| s.attempts())
        };
        assert_eq!(with(SslMode::Disable).unwrap(), &[Attempt::Plain]);
        assert_eq!(
            with(SslMode::Allow).unwrap(),
            &[Attempt::Plain, Attempt::Tls]
        );
        assert_eq!(
            with(SslMode::Prefer).unwrap(),
            &[Attempt::Tls, Attempt::Plain]
        );
        assert_eq!(with(SslMode::Require).unwrap(), &[Attempt::Tls]);
        let e = with(SslMode::VerifyFull).unwrap_err();
        assert_eq!(e.key, "sslrootcert");
        let unix = Requested {
            mode: SslMode::Require,
            ..Default::default()
        }
        .resolve(true)
        .unwrap();
        assert_eq!(unix.attempts(), &[Attempt::Plain]);
    }

    #[test]
    fn system_roots_are_the_os_bundle() {
        let r = Requested {
            mode: SslMode::VerifyFull,
            rootcert: Some("system".into()),
            ..Default::default()
        }
        .resolve(false);
        match system_bundle() {
            Some(path) => {
                let s = r.unwrap();
                assert_eq!(s.root, Some(RootCert::System(path)));
                assert_eq!(s.check(), Check::ChainAndName);
            }
            None => assert_eq!(r.unwrap_err().key, "sslrootcert"),
        }
    }

    #[test]
    fn missing_files_name_their_key() {
        let e = Requested {
            mode: SslMode::VerifyFull,
            rootcert: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        }
        .resolve(false)
        .unwrap_err();
        assert_eq!(e.key, "sslrootcert");
        assert!(e.message.contains("/nonexistent/ca.pem"), "{}", e.message);
        let e = Requested {
            mode: SslMode::Require,
            cert: Some("/nonexistent/c.pem".into()),
            ..Default::default()
        }
        .resolve(false)
        .unwrap_err();
        assert_eq!(e.key, "sslkey");
    }
}
