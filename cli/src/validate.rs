//! `ninelives validate FILE...`

use std::path::PathBuf;
use std::process::ExitCode;

use ninelives_core::manifest::check_manifests;

/// Checks every document of every file; prints one line per problem.
pub fn run(files: &[PathBuf]) -> ExitCode {
    let mut problems = 0usize;
    let mut jobs = 0usize;
    for file in files {
        let shown = file.display();
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{shown}: cannot read: {e}");
                problems += 1;
                continue;
            }
        };
        let checks = match check_manifests(&text) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{shown}: {e}");
                problems += 1;
                continue;
            }
        };
        if checks.is_empty() {
            eprintln!("{shown}: no documents");
            problems += 1;
        }
        for check in &checks {
            match &check.result {
                Ok(_) => {
                    jobs += 1;
                    println!("{shown}: {}: valid", check.label());
                }
                Err(violations) => {
                    for v in violations {
                        problems += 1;
                        let path = if v.path.is_empty() { "(document)" } else { v.path.as_str() };
                        eprintln!("{shown}: {}: {path}: {}", check.label(), v.message);
                    }
                }
            }
        }
    }
    if problems == 0 {
        println!("{jobs} TrainingJob(s) valid");
        ExitCode::SUCCESS
    } else {
        eprintln!("{problems} problem(s) found");
        ExitCode::FAILURE
    }
}
