//! `tls_server_config` -> a rustls server configuration. Certificates and
//! keys are read when the configuration is (re)loaded, so a rotated
//! certificate is served from the next reload on.

use std::sync::Arc;

use rustls::{
    client::danger::HandshakeSignatureValid,
    crypto::{ring as ring_provider, CryptoProvider, SupportedKxGroup},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        WebPkiClientVerifier,
    },
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite, SupportedProtocolVersion,
};

use super::web_config::{ClientAuth, PemSource, TlsSettings, TlsVersion};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {source_name}: {error}")]
    Read {
        what: &'static str,
        source_name: String,
        error: std::io::Error,
    },
    #[error("{what} {source_name}: {message}")]
    Pem {
        what: &'static str,
        source_name: String,
        message: String,
    },
    #[error("tls_server_config: {0}")]
    Settings(String),
    #[error("tls_server_config: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the rustls configuration; `warn` receives settings that are
/// accepted but cannot be honoured by rustls (old versions, CBC suites).
pub fn server_config(
    settings: &TlsSettings,
    warn: &mut dyn FnMut(String),
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(provider(settings, warn)?);
    let versions = protocol_versions(settings, warn);
    let certs = certificates(&settings.cert, "cert_file")?;
    let key = private_key(&settings.key)?;
    let verifier = client_verifier(settings, &provider)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn protocol_versions(
    settings: &TlsSettings,
    warn: &mut dyn FnMut(String),
) -> Vec<&'static SupportedProtocolVersion> {
    if settings.min_version < TlsVersion::Tls12 {
        warn(format!(
            "tls_server_config: min_version {:?} asked for; rustls serves TLS 1.2 and 1.3 only, so TLS 1.2 is the minimum",
            settings.min_version
        ));
    }
    let mut versions = Vec::new();
    if settings.min_version <= TlsVersion::Tls12 && settings.max_version >= TlsVersion::Tls12 {
        versions.push(&rustls::version::TLS12);
    }
    if settings.max_version >= TlsVersion::Tls13 {
        versions.push(&rustls::version::TLS13);
    }
    versions
}

/// ring's provider, narrowed to the configured TLS 1.2 cipher suites and
/// curves. Like Go, `cipher_suites` does not touch TLS 1.3's suites.
fn provider(
    settings: &TlsSettings,
    warn: &mut dyn FnMut(String),
) -> Result<CryptoProvider, TlsError> {
    let mut provider = ring_provider::default_provider();
    if !settings.cipher_suites.is_empty() {
        let mut chosen: Vec<SupportedCipherSuite> = Vec::new();
        for name in &settings.cipher_suites {
            match provider
                .cipher_suites
                .iter()
                .find(|s| suite_name(s) == go_suite_name(name))
            {
                Some(suite) => chosen.push(*suite),
                None => warn(format!(
                    "tls_server_config: cipher suite {name} is not available in rustls (it only has AEAD suites with forward secrecy); skipped"
                )),
            }
        }
        if !chosen.iter().any(|s| s.tls13().is_none()) {
            return Err(TlsError::Settings(format!(
                "none of cipher_suites {:?} is available in rustls; use e.g. TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 or TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
                settings.cipher_suites
            )));
        }
        chosen.extend(
            provider
                .cipher_suites
                .iter()
                .filter(|s| s.tls13().is_some())
                .copied(),
        );
        provider.cipher_suites = chosen;
    }
    if !settings.curve_preferences.is_empty() {
        let mut groups: Vec<&'static dyn SupportedKxGroup> = Vec::new();
        for name in &settings.curve_preferences {
            let group = match name.as_str() {
                "X25519" => Some(ring_provider::kx_group::X25519),
                "CurveP256" => Some(ring_provider::kx_group::SECP256R1),
                "CurveP384" => Some(ring_provider::kx_group::SECP384R1),
                _ => None,
            };
            match group {
                Some(group) => groups.push(group),
                None => warn(format!(
                    "tls_server_config: curve {name} is not available in rustls; skipped"
                )),
            }
        }
        if groups.is_empty() {
            return Err(TlsError::Settings(format!(
                "none of curve_preferences {:?} is available: use X25519, CurveP256 or CurveP384",
                settings.curve_preferences
            )));
        }
        provider.kx_groups = groups;
    }
    Ok(provider)
}

fn suite_name(suite: &SupportedCipherSuite) -> String {
    format!("{:?}", suite.suite())
}

/// Go spells the ChaCha20 suites without their hash.
fn go_suite_name(name: &str) -> String {
    if name.ends_with("CHACHA20_POLY1305") {
        format!("{name}_SHA256")
    } else {
        name.to_owned()
    }
}

fn certificates(
    source: &PemSource,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(source, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(source, what, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(source, what, "no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn private_key(source: &PemSource) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(source, "key_file")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        pem_error(
            source,
            "key_file",
            format!("no usable PEM private key ({e})"),
        )
    })
}

fn read(source: &PemSource, what: &'static str) -> Result<Vec<u8>, TlsError> {
    source.read().map_err(|error| TlsError::Read {
        what,
        source_name: source.describe(),
        error,
    })
}

fn pem_error(source: &PemSource, what: &'static str, message: String) -> TlsError {
    TlsError::Pem {
        what,
        source_name: source.describe(),
        message,
    }
}

fn client_verifier(
    settings: &TlsSettings,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let verifying = |optional: bool| -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let ca = settings
            .client_ca
            .as_ref()
            .ok_or_else(|| TlsError::Settings("client_ca_file is missing".into()))?;
        let mut roots = RootCertStore::empty();
        for cert in certificates(ca, "client_ca_file")? {
            roots.add(cert)?;
        }
        let builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let builder = if optional {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        builder
            .build()
            .map_err(|e| TlsError::Settings(format!("client_ca_file: {e}")))
    };
    let verifier = match settings.client_auth {
        ClientAuth::NoClientCert => WebPkiClientVerifier::no_client_auth(),
        ClientAuth::RequestClientCert => Arc::new(UnverifiedClientCert {
            mandatory: false,
            provider: provider.clone(),
        }),
        ClientAuth::RequireAnyClientCert => Arc::new(UnverifiedClientCert {
            mandatory: true,
            provider: provider.clone(),
        }),
        ClientAuth::VerifyClientCertIfGiven => verifying(true)?,
        ClientAuth::RequireAndVerifyClientCert => verifying(false)?,
    };
    if settings.client_allowed_sans.is_empty() {
        Ok(verifier)
    } else {
        Ok(Arc::new(AllowedSans {
            inner: verifier,
            allowed: settings.client_allowed_sans.clone(),
        }))
    }
}

/// Go's RequestClientCert / RequireAnyClientCert: a certificate is asked
/// for (or required) but not checked against a CA; the handshake signature
/// still proves the client holds its key.
#[derive(Debug)]
struct UnverifiedClientCert {
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for UnverifiedClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// exporter-toolkit's `client_allowed_sans`: a verified client certificate
/// must also carry one of these subject alternative names.
#[derive(Debug)]
struct AllowedSans {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for AllowedSans {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let names = subject_alt_names(end_entity);
        if names.iter().any(|n| self.allowed.contains(n)) {
            Ok(verified)
        } else {
            Err(rustls::Error::General(format!(
                "client certificate SANs {names:?} are not in client_allowed_sans"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// DNS names, IP addresses, e-mail addresses and URIs of a certificate,
/// as strings (what exporter-toolkit compares `client_allowed_sans` with).
fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(n) | GeneralName::RFC822Name(n) | GeneralName::URI(n) => {
                Some((*n).to_owned())
            }
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::Ipv4Addr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::Ipv6Addr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}
