//! The container image, built here without a container runtime by the project's own script
//! (`scripts/build-image`: an OCI layout assembled with umoci) and run with runc: the
//! entrypoint must print `ninelives --version` as the non-root user the chart expects.

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
    assert!(log.contains(&"smoke test passed via "), "{log}");
    assert!(log.contains(&version), "{log}");

    // The image's config is what the chart and the operator's pods rely on.
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("oci/index.json")).expect("index.json"))
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
