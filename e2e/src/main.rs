//! `cargo run -p ninelives-e2e -- up`: the e2e control plane, for people to explore.

use std::process::ExitCode;

use ninelives_e2e::{Harness, tools};

const USAGE: &str = "usage: ninelives-e2e up [--nodes N] [--no-operator]

Starts etcd, kube-apiserver (with the TrainingJob CRD), N fake nodes (default 4) that run pods as
local processes, and two operator replicas; prints the KUBECONFIG path. Ctrl-C stops everything.
Build the control-plane tools first: e2e/tools/build.sh";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("up") {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let mut nodes = 4;
    let mut with_operator = true;
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--nodes" => match rest.next().and_then(|n| n.parse().ok()) {
                Some(n) => nodes = n,
                None => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--no-operator" => with_operator = false,
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    ninelives_telemetry::init_tracing("info,kube=warn");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(up(nodes, with_operator)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn up(nodes: usize, with_operator: bool) -> ninelives_e2e::Result<()> {
    let harness = Harness::start(nodes).await?;
    let operators = if with_operator {
        vec![harness.operator("operator-a", 15)?, harness.operator("operator-b", 15)?]
    } else {
        Vec::new()
    };
    let kubeconfig = harness.plane.kubeconfig().display().to_string();
    println!("control plane up: {}", harness.plane.server());
    println!("etcd:             {}", harness.plane.etcd.endpoint());
    for op in &operators {
        println!("operator {}: http://{}/metrics", op.identity, op.admin);
    }
    println!("pod logs:         {}", harness.plane.dir().join("pods").display());
    println!("workers:          {:?}", harness.worker);
    println!();
    println!("export KUBECONFIG={kubeconfig}");
    println!("export PATH={}:$PATH", tools::tool_dir().display());
    println!("kubectl apply -f examples/tiny.yaml && kubectl get tj,pods -w");
    println!();
    println!("Ctrl-C stops everything.");
    let _ = tokio::signal::ctrl_c().await;
    println!("stopping");
    drop(operators);
    drop(harness);
    Ok(())
}
