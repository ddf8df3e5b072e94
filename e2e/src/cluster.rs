//! A local control plane: etcd (testkit) and a kube-apiserver on loopback with temporary
//! certificates, a kubeconfig, and the CRDs applied.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use ninelives_testkit::{EtcdServer, free_port};

use crate::certs::Pki;
use crate::error::{Error, Result};
use crate::tools;

const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// etcd + kube-apiserver, stopped (killed) when dropped.
pub struct ControlPlane {
    /// The apiserver's storage and the coordination store of the jobs (one etcd serves both:
    /// the apiserver keeps its data under `/registry`, ninelives under `/ninelives/`).
    pub etcd: EtcdServer,
    apiserver: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    kubeconfig: PathBuf,
    operator_kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver, waits until the apiserver is ready and the `default`
    /// namespace exists, and applies `crds/`.
    pub fn start() -> Result<Self> {
        let apiserver_bin = tools::tool("kube-apiserver")?;
        tools::tool("kubectl")?;
        let etcd = EtcdServer::start()?;
        let dir = tempfile::Builder::new().prefix("ninelives-e2e-").tempdir()?;
        let pki = Pki::write(dir.path())?;
        let port = free_port()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(port, &pki.ca_cert, &pki.admin_cert, &pki.admin_key))?;
        let operator_kubeconfig = dir.path().join("kubeconfig-operator");
        std::fs::write(
            &operator_kubeconfig,
            kubeconfig_yaml(port, &pki.ca_cert, &pki.operator_cert, &pki.operator_key),
        )?;

        let log = std::fs::File::create(dir.path().join("kube-apiserver.log"))?;
        let p = |path: &Path| path.display().to_string();
        let child = Command::new(apiserver_bin)
            .arg(format!("--etcd-servers={}", etcd.endpoint()))
            .arg(format!("--secure-port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            // The `kubernetes` Service endpoint cannot be a loopback address; nothing here needs it.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--cert-dir={}", dir.path().display()))
            .arg(format!("--tls-cert-file={}", p(&pki.serving_cert)))
            .arg(format!("--tls-private-key-file={}", p(&pki.serving_key)))
            .arg(format!("--client-ca-file={}", p(&pki.ca_cert)))
            .arg(format!("--service-account-issuer=https://127.0.0.1:{port}"))
            .arg(format!("--service-account-key-file={}", p(&pki.service_account_public_key)))
            .arg(format!("--service-account-signing-key-file={}", p(&pki.service_account_key)))
            .arg("--service-cluster-ip-range=10.96.0.0/24")
            .arg("--authorization-mode=RBAC")
            // No controller-manager mints service-account tokens here.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--enable-priority-and-fairness=false")
            .arg("--allow-privileged=true")
            .arg("--profiling=false")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let plane = ControlPlane { etcd, apiserver: Some(child), dir, port, kubeconfig, operator_kubeconfig };
        plane.wait_ready()?;
        plane.kubectl(&[
            "apply",
            "--server-side",
            "-f",
            &tools::repo_root().join("crds").display().to_string(),
        ])?;
        plane.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/trainingjobs.ninelives.io",
        ])?;
        Ok(plane)
    }

    fn wait_ready(&self) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < READY_TIMEOUT {
            let ready = self.kubectl(&["get", "--raw", "/readyz"]).is_ok_and(|out| out.trim() == "ok");
            if ready && self.kubectl(&["get", "namespace", "default"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(Error::Unhealthy {
            what: "kube-apiserver".into(),
            seconds: READY_TIMEOUT.as_secs(),
            log: tail(&self.dir.path().join("kube-apiserver.log"), 40),
        })
    }

    /// Path of the admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Kubeconfig of the chart's operator ServiceAccount ([`crate::certs::OPERATOR_USER`]): it can
    /// do only what RBAC bound to that ServiceAccount allows.
    pub fn operator_kubeconfig(&self) -> &Path {
        &self.operator_kubeconfig
    }

    /// The apiserver URL.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Scratch directory of this control plane (logs, certificates, pod work dirs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kube client authenticated as the admin.
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig =
            Kubeconfig::read_from(&self.kubeconfig).map_err(|e| Error::Kubeconfig(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Runs kubectl against this control plane; returns stdout, or an error with both streams.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_stdin(args, None)
    }

    /// Runs kubectl with `stdin` piped in.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut command = Command::new(tools::tool("kubectl")?);
        command.args(args).env("KUBECONFIG", &self.kubeconfig);
        run(command, stdin)
    }
}

/// Runs `command`, feeding it `stdin`; stdout on success.
pub fn run(mut command: Command, stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let line = format!("{command:?}");
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn()?;
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin.unwrap_or_default().as_bytes())?;
    }
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(Error::Command {
            command: line,
            status: output.status.to_string(),
            output: format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)),
        })
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn kubeconfig_yaml(port: u16, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ninelives-e2e
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {ca}
users:
- name: admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: ninelives-e2e
  context:
    cluster: ninelives-e2e
    user: admin
    namespace: default
current-context: ninelives-e2e
",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    )
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
