//! The committed CRD must be exactly what the Rust types generate.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

#[test]
fn committed_crd_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/trainingjob.yaml");
    let committed = std::fs::read_to_string(path).unwrap();
    let generated = ninelives_core::crd_yaml();
    assert!(
        committed == generated,
        "crds/trainingjob.yaml is stale: run `scripts/gen-crd` and commit the result"
    );
}

#[test]
fn crd_has_the_api_users_rely_on() {
    let crd: serde_json::Value = serde_saphyr::from_str(&ninelives_core::crd_yaml()).unwrap();
    assert_eq!(crd["spec"]["group"], "ninelives.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "tj");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Phase", "Step", "Loss", "Healthy", "Recoveries", "Age"]);
    let rules = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["topology"]
        ["x-kubernetes-validations"]
        .as_array()
        .unwrap();
    assert!(rules.iter().any(|r| r["fieldPath"] == ".chipsPerNode"));
}
