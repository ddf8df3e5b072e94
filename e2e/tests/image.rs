//! What a deployment is made of, checked with real tools: the container image, built here
//! without a container runtime by the project's own script (`scripts/build-image`: an OCI
//! layout assembled with umoci) and run with runc; and the etcd certificates of the chart's
//! one-shot generator, used by a worker against a real etcd that requires client certificates.

use std::process::Command;

use ninelives_e2e::cluster::run;
use ninelives_e2e::tools;

#[test]
fn image_builds_without_a_container_runtime_and_runs_ninelives_version() {
    let binary = tools::ninelives().unwrap_or_else(|e| panic!("{e}"));
    let out = tempfile::Builder::new().prefix("ninelives-image-").tempdir().expect("tempdir");
    let mut build = Command::new(tools::repo_root().join("scripts/build-image"));
    build.arg("--binary").arg(&binary).arg("--out").arg(out.path()).args(["--tag", "e2e", "--smoke"]);
    let log = run(build, None).unwrap_or_else(|e| panic!("{e}"));
    let version = format!("ninelives {}", env!("CARGO_PKG_VERSION"));
    assert!(log.contains("smoke test passed via "), "{log}");
    assert!(log.contains(&version), "{log}");

    // The image's config is what the chart and the operator's pods rely on.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("oci/index.json")).expect("index.json"),
    )
    .expect("index JSON");
    let manifest = &index["manifests"][0];
    assert_eq!(manifest["annotations"]["org.opencontainers.image.ref.name"], "e2e");
    let blob = |digest: &serde_json::Value| -> serde_json::Value {
        let digest = digest.as_str().expect("digest").replace(':', "/");
        let text = std::fs::read_to_string(out.path().join("oci/blobs").join(digest)).expect("blob");
        serde_json::from_str(&text).expect("blob JSON")
    };
    let image_manifest = blob(&manifest["digest"]);
    let config = blob(&image_manifest["config"]["digest"]);
    assert_eq!(config["config"]["User"], "65532:65532", "non-root, as runAsNonRoot requires");
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/ninelives");
    assert!(out.path().join("ninelives-e2e.oci.tar").is_file(), "an archive containerd can import");
}

/// `scripts/etcd-certs` makes certificates a real etcd (Debian's) accepts for serving and client
/// authentication, and the worker's TLS connection (the files worker pods get through
/// `NINELIVES_ETCD_{CA,CERT,KEY}_FILE`) writes and reads through it; without a client
/// certificate it is refused.
#[test]
fn generated_etcd_certificates_authenticate_a_worker_to_a_tls_etcd() {
    use ninelives_worker::dist::rendezvous::{Etcd, EtcdTlsFiles};

    let dir = tempfile::Builder::new().prefix("ninelives-etcd-tls-").tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let mut generator = Command::new(tools::repo_root().join("scripts/etcd-certs"));
    generator.args(["ninelives", "ninelives-system"]).arg(&certs);
    run(generator, None).unwrap_or_else(|e| panic!("{e}"));
    let file = |name: &str| certs.join(name);
    let (client, peer) =
        (ninelives_testkit::free_port().expect("port"), ninelives_testkit::free_port().expect("port"));
    let endpoint = format!("https://127.0.0.1:{client}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
    let mut etcd = Command::new("etcd")
        .args(["--name", "tls", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg(format!("--listen-client-urls={endpoint}"))
        .arg(format!("--advertise-client-urls={endpoint}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!("--initial-cluster=tls=http://127.0.0.1:{peer}"))
        .arg("--client-cert-auth=true")
        .arg(format!("--trusted-ca-file={}", file("ca.crt").display()))
        .arg(format!("--cert-file={}", file("server.crt").display()))
        .arg(format!("--key-file={}", file("server.key").display()))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("etcd (Debian etcd-server)");
    let keys = ninelives_core::keyspace::Keyspace::new("/tls-test/").job("default", "tls");
    let tls = EtcdTlsFiles {
        ca: Some(file("ca.crt")),
        cert: Some(file("client.crt")),
        key: Some(file("client.key")),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let connected = loop {
        match Etcd::connect_tls(std::slice::from_ref(&endpoint), keys.clone(), &tls)
            .and_then(|etcd| etcd.put("/tls-test/probe", b"ok".to_vec(), None).map(|()| etcd))
        {
            Ok(etcd) => break etcd,
            Err(e) if std::time::Instant::now() > deadline => {
                let _ = etcd.kill();
                panic!("no TLS connection to etcd: {e}");
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(300)),
        }
    };
    assert_eq!(connected.get("/tls-test/probe").expect("get").as_deref(), Some(&b"ok"[..]));
    let anonymous = EtcdTlsFiles { ca: Some(file("ca.crt")), cert: None, key: None };
    let refused = Etcd::connect_tls(std::slice::from_ref(&endpoint), keys, &anonymous)
        .and_then(|etcd| etcd.put("/tls-test/anonymous", b"no".to_vec(), None));
    let _ = etcd.kill();
    let _ = etcd.wait();
    assert!(refused.is_err(), "etcd accepted a client without a certificate");
}
