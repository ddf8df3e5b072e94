//! Issue 23 acceptance: a stranger on the network cannot take part in a job's expert-parallel
//! transport. While `ninelives worker launch` trains two real worker processes on loopback, raw
//! TCP clients connect to both workers' peer ports and send a `Hello` they cannot back with a
//! proof, a forged `Push`, oversized frames, an idle connection and a flood of connections. Every
//! one is refused, and the job ends with the digest of an undisturbed single-process run, without
//! a single aborted step or a second generation.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ninelives_core::keyspace::Keyspace;
use ninelives_testkit::EtcdServer;
use ninelives_worker::dist::link::HANDSHAKE_TIMEOUT;
use ninelives_worker::dist::rendezvous::Etcd;
use ninelives_worker::dist::wire::{FrameReader, Msg, ReadError, write_frame};

mod common;
use common::{BIN, SmallJob, digest_of};
// Long enough (a few tens of milliseconds a step, with the reference run beside it) that the
// members outlive every attack; the test checks they did.
const STEPS: u32 = 600;

/// Connects with short timeouts (the worker must answer or close promptly).
fn dial(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    s
}

/// Reads frames until the worker closes the connection (bounded by `limit`); returns them.
fn until_closed(stream: &mut TcpStream, limit: Duration) -> Vec<Msg> {
    let deadline = Instant::now() + limit;
    let mut reader = FrameReader::new(1 << 20);
    let mut got = Vec::new();
    while Instant::now() < deadline {
        match reader.next(stream) {
            Ok(Some(msg)) => got.push(msg),
            Ok(None) => {}
            Err(ReadError::Closed | ReadError::Io(_)) => return got,
            Err(e) => panic!("the worker sent something unreadable: {e}"),
        }
    }
    panic!("the worker kept the connection open for {limit:?}; it sent {got:?}");
}

fn refused(msgs: &[Msg]) -> bool {
    matches!(msgs.last(), Some(Msg::Refused { .. }))
}

/// Every attack against one worker's peer port; each must end in a closed connection.
fn attack(addr: SocketAddr) {
    // 1. A Hello: the worker answers with its challenge (it proves itself), but a proof we cannot
    //    make is refused and the connection closed.
    let mut s = dial(addr);
    write_frame(&mut s, &Msg::Hello { generation: 1, rank: 1, nonce: [1; 32] }, None).unwrap();
    let mut reader = FrameReader::new(1 << 10);
    let deadline = Instant::now() + Duration::from_secs(5);
    let challenge = loop {
        if let Some(m) = reader.next(&mut s).unwrap() {
            break m;
        }
        assert!(Instant::now() < deadline, "no challenge");
    };
    assert!(matches!(challenge, Msg::Challenge { .. }), "{challenge:?}");
    write_frame(&mut s, &Msg::Proof { proof: [0; 32] }, None).unwrap();
    let answer = until_closed(&mut s, Duration::from_secs(5));
    assert!(refused(&answer), "a wrong proof: {answer:?}");

    // 2. A Hello, then the connection closed at once (it used to read as a lost member).
    let mut s = dial(addr);
    write_frame(&mut s, &Msg::Hello { generation: 1, rank: 0, nonce: [2; 32] }, None).unwrap();
    drop(s);

    // 3. A forged Push as the first frame, naming a real generation and step.
    let mut s = dial(addr);
    let push = Msg::Push { generation: 1, step: 2, round: 1, payload: vec![0xAB; 100] };
    write_frame(&mut s, &push, None).unwrap();
    let answer = until_closed(&mut s, Duration::from_secs(5));
    assert!(refused(&answer), "a forged push: {answer:?}");

    // 4. A 4 GiB length prefix: refused on the prefix alone.
    let mut s = dial(addr);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let answer = until_closed(&mut s, Duration::from_secs(5));
    assert!(refused(&answer), "a 4 GiB frame: {answer:?}");

    // 5. A 16 MiB frame followed by its bytes, and an HTTP request (its first four bytes read as
    //    a 542 MB length): the worker closes after the prefix, long before a body is buffered.
    //    (Closing with unread bytes resets the connection, so the refusal itself may be lost.)
    let mut s = dial(addr);
    s.write_all(&(16u32 << 20).to_le_bytes()).unwrap();
    let chunk = vec![0x5A; 64 * 1024];
    for _ in 0..256 {
        if s.write_all(&chunk).is_err() {
            break; // reset by the worker
        }
    }
    until_closed(&mut s, Duration::from_secs(5));
    let mut s = dial(addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    until_closed(&mut s, Duration::from_secs(5));
}

#[test]
fn strangers_are_refused_and_training_is_unaffected() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = SmallJob { nodes: 2, steps: u64::from(STEPS), interval: 100, ..SmallJob::named("attacked") }
        .write(dir.path());

    // The undisturbed reference runs beside the attacked job (it also slows that job down, which
    // keeps its members alive through the attacks).
    let single = Command::new(BIN)
        .args(["worker", "train", &m, "--threads", "1"])
        .arg("--checkpoint-dir")
        .arg(dir.path().join("single"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let mut child = Command::new(BIN)
        .args(["worker", "launch", &m, "--workers", "2", "--etcd", &etcd.endpoint()])
        .arg("--checkpoint-dir")
        .arg(dir.path().join("ckpt"))
        .args(["--threads", "1", "--step-timeout-seconds", "30"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Attack once both members trained a step: mid-run, connections established.
    while !seen.iter().any(|l: &String| l.starts_with("[rank 1] step=1 ")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|_| panic!("no step 1:\n{}", seen.join("\n")));
        seen.push(line);
    }
    let etcd_link =
        Etcd::connect(&[etcd.endpoint()], Keyspace::default().job("default", "attacked")).unwrap();
    let addrs: Vec<SocketAddr> = etcd_link.members().unwrap().values().map(|m| m.addr).collect();
    assert_eq!(addrs.len(), 2, "both members registered");

    // First (they take the handshake timeout): an idle connection that never says anything, and
    // a flood beyond the handshake bound.
    let opened = Instant::now();
    let mut idle = dial(addrs[0]);
    let flood: Vec<TcpStream> = (0..80).map(|_| dial(addrs[1])).collect();
    // Closed when its handshake time ran out, not before.
    let answer = until_closed(&mut idle, HANDSHAKE_TIMEOUT + Duration::from_secs(5));
    assert!(refused(&answer) && opened.elapsed() >= HANDSHAKE_TIMEOUT, "{answer:?}");
    // Past the bound, connections are closed as they arrive (no thread, no buffer, no answer);
    // the others were refused when their handshake time ran out.
    let closed_at_once = flood
        .into_iter()
        .filter(|s| {
            let mut s = s.try_clone().unwrap();
            let mut b = [0u8; 1];
            matches!(s.read(&mut b), Ok(0))
        })
        .count();
    assert!(closed_at_once >= 80 - 64, "only {closed_at_once} of 80 flooding connections were closed");
    for &addr in &addrs {
        attack(addr);
    }
    // Every check above ran against live members: a job that ended first would prove nothing.
    assert!(child.try_wait().unwrap().is_none(), "the job ended before the attacks did; raise STEPS");

    let status = loop {
        while let Ok(line) = lines.try_recv() {
            seen.push(line);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the job did not finish:\n{}", seen.join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
        seen.push(line);
    }
    let all = seen.join("\n");
    assert!(status.success(), "{all}");
    let single = single.wait_with_output().unwrap();
    let single_out = String::from_utf8_lossy(&single.stdout).into_owned();
    assert!(single.status.success(), "{single_out}\n{}", String::from_utf8_lossy(&single.stderr));
    let expected = digest_of(&single_out);
    assert!(!all.contains("aborted"), "a step was abandoned:\n{all}");
    assert!(!all.contains("generation=2"), "a recovery happened:\n{all}");
    assert_eq!(
        all.lines().filter(|l| l.starts_with("[rank 0] step=")).count(),
        STEPS as usize,
        "every step once:\n{all}"
    );
    assert_eq!(digest_of(&all), expected, "the attacked run equals the undisturbed one\n{all}");
}
