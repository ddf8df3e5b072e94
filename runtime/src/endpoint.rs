//! The command endpoint of a supervised worker that has none of its own.
//!
//! Agents execute placement generations by `POST /ninelives/v1/command` to each local worker
//! (ARCHITECTURE.md, "Local execution protocol") and ack the generation once every command was
//! answered 2xx. The single-process worker has no such endpoint, so its supervisor serves it: a
//! `restore` is carried out by restarting the worker from the newest committed checkpoint and is
//! answered once the restarted worker completed a step; `loadExperts` and `reroute` are answered
//! at once (the one process holds every expert and routes internally).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// The agent's command to a local worker: the agent's own type, so the protocol cannot drift.
pub use ninelives_agent::exec::WorkerCommand;

/// One request, with the channel its answer goes back on.
#[derive(Debug)]
pub struct CommandRequest {
    /// The command.
    pub command: WorkerCommand,
    /// `Ok` → 200, `Err(text)` → 500 with the text.
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// Largest request accepted.
const MAX_REQUEST: usize = 1 << 20;

/// Parses a whole HTTP request (head and body) into a command.
pub fn parse_request(raw: &[u8]) -> Result<WorkerCommand, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "request is not UTF-8".to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("incomplete HTTP request")?;
    let request_line = head.lines().next().unwrap_or_default();
    if !request_line.starts_with("POST /ninelives/v1/command ") {
        return Err(format!("unexpected request {request_line:?}"));
    }
    serde_json::from_str(body).map_err(|e| format!("bad command: {e}"))
}

/// Content length declared in a request head, once the head is complete.
fn body_length(raw: &[u8]) -> Option<(usize, usize)> {
    let text = std::str::from_utf8(raw).ok()?;
    let end = text.find("\r\n\r\n")? + 4;
    let length = text[..end]
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    Some((end, length))
}

async fn handle(mut stream: TcpStream, tx: mpsc::Sender<CommandRequest>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let answer = loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        if raw.len() > MAX_REQUEST {
            break Err("request too large".to_string());
        }
        if let Some((head, length)) = body_length(&raw)
            && raw.len() >= head + length
        {
            break match parse_request(&raw) {
                Err(e) => Err(e),
                Ok(command) => {
                    let (reply, wait) = oneshot::channel();
                    if tx.send(CommandRequest { command, reply }).await.is_err() {
                        Err("the run is shutting down".to_string())
                    } else {
                        wait.await.unwrap_or_else(|_| Err("the run is shutting down".to_string()))
                    }
                }
            };
        }
    };
    let response = match answer {
        Ok(()) => "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string(),
        Err(e) => format!(
            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{e}",
            e.len()
        ),
    };
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Serves the endpoint on `listener` until the receiver of `tx` is dropped.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<CommandRequest>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        if tx.is_closed() {
            return;
        }
        tokio::spawn(handle(stream, tx.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ninelives_agent::exec::{ExpertLoad, ExpertSource};

    fn request(body: &str) -> Vec<u8> {
        format!(
            "POST /ninelives/v1/command HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn parses_the_agents_commands() {
        assert_eq!(
            parse_request(&request(r#"{"op":"restore","generation":9,"checkpointStep":500}"#)),
            Ok(WorkerCommand::Restore { generation: 9, checkpoint_step: 500 })
        );
        assert_eq!(
            parse_request(&request(
                r#"{"op":"loadExperts","generation":8,"experts":[{"layer":3,"expert":17,"chip":2,"source":{"kind":"peer","node":"n5","chip":1}}]}"#
            )),
            Ok(WorkerCommand::LoadExperts {
                generation: 8,
                experts: vec![ExpertLoad {
                    layer: 3,
                    expert: 17,
                    chip: 2,
                    source: ExpertSource::Peer { node: "n5".into(), chip: 1 },
                }]
            })
        );
        assert_eq!(
            parse_request(&request(r#"{"op":"reroute","generation":3}"#)),
            Ok(WorkerCommand::Reroute { generation: 3 })
        );
        assert!(parse_request(&request(r#"{"op":"explode"}"#)).is_err());
        assert!(parse_request(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_request(b"POST /ninelives/v1/command HTTP/1.1\r\n").is_err());
        assert_eq!(body_length(&request("{}")).map(|(_, l)| l), Some(2));
    }

    #[tokio::test]
    async fn answers_over_http_with_the_handlers_result() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let answer = match req.command {
                    WorkerCommand::Restore { .. } => Err("no checkpoint".to_string()),
                    _ => Ok(()),
                };
                let _ = req.reply.send(answer);
            }
        });
        let post = |body: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(&request(body)).await.expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        };
        assert!(post(r#"{"op":"reroute","generation":2}"#).await.starts_with("HTTP/1.1 200"));
        let refused = post(r#"{"op":"restore","generation":2,"checkpointStep":25}"#).await;
        assert!(refused.starts_with("HTTP/1.1 500") && refused.ends_with("no checkpoint"), "{refused}");
    }
}
