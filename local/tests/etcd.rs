//! The real etcd as a supervised child.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ninelives_local::etcd::locate;
use ninelives_local::{LocalEtcd, RuntimeError, Supervisor};

#[test]
fn starts_answers_and_dies_with_the_supervisor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sup = Supervisor::new(dir.path().join("logs")).expect("supervisor");
    let etcd = match LocalEtcd::start(&mut sup, dir.path()) {
        Err(RuntimeError::EtcdMissing) => panic!("etcd is not installed; run scripts/setup"),
        other => other.expect("etcd starts"),
    };
    let port: u16 = etcd.endpoint.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    // A write and a read through the v3 JSON gateway.
    let post = |path: &str, body: &str| post(port, path, body);
    // key "k" = "aw==", value "v" = "dg=="
    assert!(post("/v3/kv/put", r#"{"key":"aw==","value":"dg=="}"#).contains("200 OK"));
    assert!(post("/v3/kv/range", r#"{"key":"aw=="}"#).contains("\"value\":\"dg==\""));
    let pid = sup.pid(etcd.id).expect("pid");
    drop(sup);
    // Dropping the supervisor kills and reaps etcd: its /proc entry is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(std::time::Instant::now() < deadline, "etcd (pid {pid}) outlived its supervisor");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_missing_etcd_names_the_install_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sup = Supervisor::new(dir.path().join("logs")).expect("supervisor");
    let path = std::ffi::OsStr::new("/nonexistent:/also-not");
    assert_eq!(locate("etcd", Some(path)), None);
    let err = LocalEtcd::start_on_path(&mut sup, dir.path(), Some(path)).expect_err("no etcd there");
    assert!(matches!(err, RuntimeError::EtcdMissing));
    let text = err.to_string();
    assert!(text.contains("scripts/setup") && text.contains("apt install etcd-server"), "{text}");
}

#[test]
fn a_three_member_cluster_replicates_and_survives_one_member_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sup = Supervisor::new(dir.path().join("logs")).expect("supervisor");
    let members = LocalEtcd::start_cluster(&mut sup, dir.path(), 3, None).expect("3 members start");
    assert_eq!(members.len(), 3);
    for (i, m) in members.iter().enumerate() {
        assert!(m.data_dir.ends_with(format!("etcd-data/member-{i}")), "{}", m.data_dir.display());
    }
    let port =
        |m: &LocalEtcd| -> u16 { m.endpoint.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port") };
    // One cluster: a write through member 0 is read through member 2 ...
    assert!(post(port(&members[0]), "/v3/kv/put", r#"{"key":"aw==","value":"dg=="}"#).contains("200 OK"));
    assert!(post(port(&members[2]), "/v3/kv/range", r#"{"key":"aw=="}"#).contains("\"value\":\"dg==\""));
    // ... and the two left after member 0 is killed still have a quorum for writes.
    sup.kill(members[0].id).expect("kill member 0");
    // Member 0 may have been the leader: the others elect a new one within etcd's election
    // timeout (1 s); until then a write is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    // A put sent mid-election may hang until the read timeout: that is "not yet", not a failure.
    while !try_post(port(&members[1]), "/v3/kv/put", r#"{"key":"aw==","value":"dw=="}"#)
        .is_ok_and(|r| r.contains("200 OK"))
    {
        assert!(std::time::Instant::now() < deadline, "no write accepted by the 2 members left");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(post(port(&members[2]), "/v3/kv/range", r#"{"key":"aw=="}"#).contains("\"value\":\"dw==\""));
}

/// A POST to etcd's v3 JSON gateway on `port`; the raw HTTP response.
fn post(port: u16, path: &str, body: &str) -> String {
    try_post(port, path, body).expect("POST to etcd")
}

/// [`post`], with a refused connection or a 5 s silence as an error.
fn try_post(port: u16, path: &str, body: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
