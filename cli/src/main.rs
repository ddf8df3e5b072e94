//! `ninelives`: one binary, one subcommand per part of the system.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod validate;

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
        Command::Operator(args) => ninelives_operator::main(*args),
    }
}
