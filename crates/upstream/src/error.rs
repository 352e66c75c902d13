//! The failure [`UpstreamClientBuilder`](crate::UpstreamClientBuilder) adds.

/// PEM that [`UpstreamClientBuilder::add_root_certificates_pem`](crate::UpstreamClientBuilder::add_root_certificates_pem)
/// cannot trust as roots: no certificate in it, malformed PEM, or a certificate that is not X.509.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct InvalidRootCertificate(#[from] pub(crate) Kind);

#[derive(Debug, thiserror::Error)]
pub(crate) enum Kind {
    #[error(
        "invalid root certificate: no certificate found in the PEM (expected a `-----BEGIN CERTIFICATE-----` block)"
    )]
    Empty,
    #[error("invalid root certificate: malformed PEM")]
    Pem(#[source] rustls::pki_types::pem::Error),
    #[error("invalid root certificate: not an X.509 certificate that can be a trust root")]
    Certificate(#[source] rustls::Error),
}
