//! `ninelives`: one binary, one subcommand per part of the system.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent;
mod demo;
mod launch;
mod plan;
mod simulate;
mod validate;
mod worker;

#[derive(Parser)]
#[command(
    name = "ninelives",
    version,
    about = "Keeps trillion-parameter MoE training alive through chip and node failures"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Worker subcommands.
#[derive(Subcommand)]
enum WorkerCommand {
    /// Train a TrainingJob in this process, printing one line per step and the final digest.
    Train(Box<worker::TrainArgs>),
    /// Start W expert-parallel worker processes on this machine, coordinate them through etcd,
    /// and print the final digest.
    Launch(launch::LaunchArgs),
}

#[derive(Subcommand)]
enum Command {
    /// Print the TrainingJob CustomResourceDefinition as YAML.
    Crd,
    /// Validate TrainingJob manifests (multi-document YAML allowed); exit 1 on any problem.
    Validate {
        /// Manifest files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Plan expert placement for a job and the recovery plan after the given failures.
    Plan {
        /// TrainingJob manifest.
        manifest: PathBuf,
        /// A failure: chip:<node>/<chip>, node:<node> or rack:<rack> (repeatable).
        #[arg(long = "fail", value_name = "FAILURE")]
        fail: Vec<String>,
        /// Expert load: zipf:<s> (seeded by spec.data.seed) or a JSON file with one array of
        /// per-expert token counts per layer. Uniform when omitted.
        #[arg(long, value_name = "zipf:<s>|FILE")]
        load: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Re-create only experts that lost every replica (the others run with fewer replicas).
        #[arg(long)]
        defer_redundancy: bool,
        /// Rebalance every group, moving replicas off the most loaded chips.
        #[arg(long, conflicts_with = "no_rebalance")]
        rebalance: bool,
        /// Never rebalance, however unbalanced: move exactly the state of the failed chips.
        #[arg(long)]
        no_rebalance: bool,
        /// Write the initial and the re-planned placement as JSON to FILE
        /// (`{"shape", "load", "initial", "replanned"}`), so anyone can recompute the metrics.
        #[arg(long, value_name = "FILE")]
        placement_out: Option<PathBuf>,
    },
    /// Simulate days of training under a seeded fault trace with the real recovery brain and
    /// compare recovery policies (ETTR, goodput, steps lost, time per tier).
    Simulate(Box<simulate::SimulateArgs>),
    /// The node agent: chip health, etcd presence, local execution of reshard and restore.
    Agent {
        #[command(subcommand)]
        command: agent::AgentCommand,
    },
    /// The embedded training worker.
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// Run a whole job on this machine (etcd, agents on simulated chips, workers, the recovery
    /// brain) with injected faults, and report every recovery.
    Demo(Box<demo::DemoArgs>),
    /// Run the Kubernetes operator (leader-elected TrainingJob controller).
    Operator(Box<ninelives_operator::OperatorArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", ninelives_core::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Validate { files } => validate::run(&files),
        Command::Plan {
            manifest,
            fail,
            load,
            json,
            defer_redundancy,
            rebalance,
            no_rebalance,
            placement_out,
        } => plan::run(&plan::PlanArgs {
            manifest,
            fail,
            load,
            json,
            defer_redundancy,
            rebalance,
            no_rebalance,
            placement_out,
        }),
        Command::Agent { command } => agent::run(command),
        Command::Simulate(args) => simulate::run(&args),
        Command::Worker(WorkerCommand::Train(args)) => worker::train_command(*args),
        Command::Worker(WorkerCommand::Launch(args)) => worker::run(|| launch::launch(args)),
        Command::Demo(args) => demo::run(*args),
        Command::Operator(args) => ninelives_operator::main(*args),
    }
}
