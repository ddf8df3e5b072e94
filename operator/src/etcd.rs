//! The coordination etcd as the operator reaches it: one shared client for the recovery
//! drivers and the reconciles' reads, and the clean-up of a deleted job's keys.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, DeleteOptions, Identity, TlsOptions};
use ninelives_core::keyspace::Keyspace;

use crate::error::{Error, Result};

const TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the coordination etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdConfig {
    /// Client URLs; empty means no etcd (nothing to clean up).
    pub endpoints: Vec<String>,
    /// CA bundle that signed etcd's serving certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Key of the client certificate.
    pub key_file: Option<PathBuf>,
    /// Key prefix of the keyspace.
    pub prefix: String,
    /// User and password the operator authenticates with (etcd auth on, no client-certificate
    /// identity); the user needs etcd's `root` role to manage the jobs' and agents' users.
    pub credentials: Option<Credentials>,
}

/// An etcd user name and its password; `Debug` never shows the password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub user: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

impl EtcdConfig {
    /// A client of the coordination etcd (TLS when a CA is configured).
    pub async fn connect(&self) -> Result<Client> {
        let mut options = ConnectOptions::new().with_connect_timeout(TIMEOUT).with_timeout(TIMEOUT);
        if let Some(ca) = &self.ca_file {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(tokio::fs::read(ca).await?));
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                tls = tls
                    .identity(Identity::from_pem(tokio::fs::read(cert).await?, tokio::fs::read(key).await?));
            }
            options = options.with_tls(tls);
        }
        if let Some(c) = &self.credentials {
            // Tokens expire and any auth change may invalidate them: authenticate again then.
            options = options.with_user(c.user.as_str(), c.password.as_str()).with_auto_token_refresh(true);
        }
        let connect = Client::connect(&self.endpoints, Some(options));
        match tokio::time::timeout(TIMEOUT, connect).await {
            Ok(client) => client.map_err(|source| Error::Etcd { prefix: self.prefix.clone(), source }),
            Err(_) => Err(Error::EtcdTimeout(TIMEOUT.as_secs())),
        }
    }

    /// Deletes every key of job `namespace/name`; returns how many were deleted.
    pub async fn delete_job_keys(&self, namespace: &str, name: &str) -> Result<i64> {
        if self.endpoints.is_empty() {
            return Ok(0);
        }
        let keyspace = Keyspace::new(&self.prefix);
        let root = keyspace.job(namespace, name).root().to_string();
        let mut client = self.connect().await?;
        let delete = client.delete(root.as_str(), Some(DeleteOptions::new().with_prefix()));
        match tokio::time::timeout(TIMEOUT, delete).await {
            Ok(Ok(response)) => Ok(response.deleted()),
            Ok(Err(source)) => Err(Error::Etcd { prefix: root, source }),
            Err(_) => Err(Error::EtcdTimeout(TIMEOUT.as_secs())),
        }
    }
}

/// One client of the coordination etcd, connected on first use and shared by the drivers and
/// the reconciles ([`SharedEtcd::reconnect`] drops it after a failed request).
pub struct SharedEtcd {
    /// How to reach etcd.
    pub config: EtcdConfig,
    client: Mutex<Option<Client>>,
}

impl SharedEtcd {
    /// Not connected yet.
    pub fn new(config: EtcdConfig) -> Self {
        Self { config, client: Mutex::new(None) }
    }

    /// The shared client (it reconnects by itself after a transient failure).
    pub async fn client(&self) -> Result<Client> {
        if let Some(client) = self.client.lock().ok().and_then(|c| c.clone()) {
            return Ok(client);
        }
        let client = self.config.connect().await?;
        if let Ok(mut shared) = self.client.lock() {
            *shared = Some(client.clone());
        }
        Ok(client)
    }

    /// Makes the next [`SharedEtcd::client`] connect afresh.
    pub fn reconnect(&self) {
        if let Ok(mut shared) = self.client.lock() {
            *shared = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::GetOptions;

    #[tokio::test]
    async fn deletes_only_the_jobs_keys() {
        let etcd = ninelives_testkit::EtcdServer::start().unwrap();
        let config = EtcdConfig {
            endpoints: vec![etcd.endpoint()],
            prefix: "/ninelives/".into(),
            ..Default::default()
        };
        let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
        let keys = Keyspace::new("/ninelives/");
        for key in [
            keys.job("team", "tiny").placement(),
            keys.job("team", "tiny").member(3),
            keys.job("team", "tiny2").placement(),
            keys.node_alive("node-1"),
        ] {
            client.put(key, "x", None).await.unwrap();
        }
        assert_eq!(config.delete_job_keys("team", "tiny").await.unwrap(), 2);
        let left =
            client.get("/ninelives/", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
        let left: Vec<_> = left.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
        assert_eq!(left, [keys.job("team", "tiny2").placement(), keys.node_alive("node-1")]);
    }
}
