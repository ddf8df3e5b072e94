//! Temporary PKI for a loopback kube-apiserver: a CA, the serving certificate, an admin client
//! certificate (group `system:masters`) and the service-account signing key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose,
};

use crate::error::{Error, Result};

/// Paths of the PEM files written by [`Pki::write`].
#[derive(Clone, Debug)]
pub struct Pki {
    /// CA certificate (trust anchor of clients and of client-certificate authentication).
    pub ca_cert: PathBuf,
    /// apiserver serving certificate (SANs `127.0.0.1`, `localhost`).
    pub serving_cert: PathBuf,
    /// apiserver serving key.
    pub serving_key: PathBuf,
    /// Admin client certificate.
    pub admin_cert: PathBuf,
    /// Admin client key.
    pub admin_key: PathBuf,
    /// Service-account signing key.
    pub service_account_key: PathBuf,
    /// Its public half, which verifies tokens (the apiserver reads no public key out of a
    /// PKCS#8 private key file).
    pub service_account_public_key: PathBuf,
    /// Client certificate of the operator's service account as the chart creates it
    /// ([`OPERATOR_USER`]), for running the operator with nothing but the chart's RBAC.
    pub operator_cert: PathBuf,
    /// Key of the operator's client certificate.
    pub operator_key: PathBuf,
}

/// The user name the chart's operator ServiceAccount authenticates as (release `ninelives` in
/// namespace `ninelives-system`).
pub const OPERATOR_USER: &str = "system:serviceaccount:ninelives-system:ninelives-operator";

fn leaf(
    names: Vec<String>,
    common_name: &str,
    organization: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(names).map_err(Error::Certificate)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![usage];
    Ok(params)
}

impl Pki {
    /// Generates everything into `dir`.
    pub fn write(dir: &Path) -> Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(Error::Certificate)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "ninelives-e2e-ca");
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(Error::Certificate)?)
            .map_err(Error::Certificate)?;

        let serving_key = KeyPair::generate().map_err(Error::Certificate)?;
        let serving = leaf(
            vec!["127.0.0.1".into(), "localhost".into(), "kubernetes.default.svc".into()],
            "kube-apiserver",
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?
        .signed_by(&serving_key, &ca)
        .map_err(Error::Certificate)?;

        let admin_key = KeyPair::generate().map_err(Error::Certificate)?;
        let admin = leaf(
            Vec::new(),
            "ninelives-e2e-admin",
            Some("system:masters"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?
        .signed_by(&admin_key, &ca)
        .map_err(Error::Certificate)?;
        let service_account_key = KeyPair::generate().map_err(Error::Certificate)?;
        // The x509 authenticator takes CN as the user and O as groups: this certificate is
        // indistinguishable, for RBAC, from the operator ServiceAccount's token.
        let operator_key = KeyPair::generate().map_err(Error::Certificate)?;
        let operator = leaf(
            Vec::new(),
            OPERATOR_USER,
            Some("system:serviceaccounts"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?
        .signed_by(&operator_key, &ca)
        .map_err(Error::Certificate)?;

        let pki = Pki {
            ca_cert: dir.join("ca.crt"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            service_account_key: dir.join("sa.key"),
            service_account_public_key: dir.join("sa.pub"),
            operator_cert: dir.join("operator.crt"),
            operator_key: dir.join("operator.key"),
        };
        std::fs::write(&pki.ca_cert, ca.pem())?;
        std::fs::write(&pki.serving_cert, serving.pem())?;
        std::fs::write(&pki.serving_key, serving_key.serialize_pem())?;
        std::fs::write(&pki.admin_cert, admin.pem())?;
        std::fs::write(&pki.admin_key, admin_key.serialize_pem())?;
        std::fs::write(&pki.service_account_key, service_account_key.serialize_pem())?;
        std::fs::write(&pki.service_account_public_key, service_account_key.public_key_pem())?;
        std::fs::write(&pki.operator_cert, operator.pem())?;
        std::fs::write(&pki.operator_key, operator_key.serialize_pem())?;
        Ok(pki)
    }
}
