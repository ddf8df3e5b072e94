//! Reading TrainingJob manifests: multi-document YAML in, typed jobs or precise problems out.
//!
//! The checks run in the order a user fixes them: YAML syntax, `apiVersion`/`kind`, field types
//! and unknown fields, the schema's CEL rules (evaluated client-side from the generated CRD, so
//! they are exactly what the apiserver enforces), then [`crate::validate`]'s cross-field rules.

use serde_json::Value;
use thiserror::Error;

use crate::job::{API_VERSION, KIND, TrainingJob};
use crate::validate::{Violation, validate_name, validate_spec};

/// A file that is not YAML at all; no document in it can be checked.
#[derive(Debug, Error)]
#[error("malformed YAML: {0}")]
pub struct YamlError(String);

/// The outcome for one YAML document.
#[derive(Debug)]
pub struct DocumentCheck {
    /// Zero-based position in the file (empty documents are counted too).
    pub index: usize,
    /// `metadata.name`, when the document has one.
    pub name: Option<String>,
    /// The job, or everything wrong with it.
    pub result: Result<Box<TrainingJob>, Vec<Violation>>,
}

impl DocumentCheck {
    /// A label for messages: `document 2 (tiny)`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("document {} ({name})", self.index + 1),
            None => format!("document {}", self.index + 1),
        }
    }
}

/// Parses and checks every document of a YAML stream. Empty documents are skipped.
pub fn check_manifests(text: &str) -> Result<Vec<DocumentCheck>, YamlError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| YamlError(e.to_string()))?;
    Ok(docs
        .into_iter()
        .enumerate()
        .filter(|(_, doc)| !doc.is_null())
        .map(|(index, doc)| {
            let name = doc.pointer("/metadata/name").and_then(Value::as_str).map(str::to_string);
            DocumentCheck { index, name, result: check_document(doc).map(Box::new) }
        })
        .collect())
}

/// Parses one manifest that must hold exactly one valid TrainingJob.
pub fn parse_job(text: &str) -> Result<TrainingJob, Vec<Violation>> {
    let checks = check_manifests(text).map_err(|e| vec![Violation::new("", e.to_string())])?;
    let mut jobs = checks.into_iter();
    match (jobs.next(), jobs.next()) {
        (Some(one), None) => one.result.map(|b| *b),
        (None, _) => Err(vec![Violation::new("", "no TrainingJob document found")]),
        (Some(_), Some(_)) => {
            Err(vec![Violation::new("", "expected one TrainingJob, found several documents")])
        }
    }
}

/// Checks one parsed document, collecting every problem it has.
pub fn check_document(doc: Value) -> Result<TrainingJob, Vec<Violation>> {
    let Value::Object(map) = &doc else {
        return Err(vec![Violation::new("", "document is not a mapping")]);
    };
    let mut problems = Vec::new();
    match map.get("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(other) => {
            problems.push(Violation::new("apiVersion", format!("expected {API_VERSION:?}, found {other}")))
        }
        None => problems.push(Violation::new("apiVersion", format!("missing; expected {API_VERSION:?}"))),
    }
    match map.get("kind") {
        Some(Value::String(k)) if k == KIND => {}
        Some(other) => problems.push(Violation::new("kind", format!("expected {KIND:?}, found {other}"))),
        None => problems.push(Violation::new("kind", format!("missing; expected {KIND:?}"))),
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    let mut unknown = Vec::new();
    let typed = {
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let de = serde_ignored::Deserializer::new(&doc, &mut record);
        serde_path_to_error::deserialize::<_, TrainingJob>(de)
    };
    // kube's derived type reads apiVersion and kind itself (checked above) without consuming them.
    for path in unknown.into_iter().filter(|p| p != "apiVersion" && p != "kind") {
        problems.push(Violation::new(path, "unknown field"));
    }
    let job = match typed {
        Ok(job) => job,
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            problems.push(Violation::new(path, e.into_inner().to_string()));
            return Err(problems);
        }
    };

    if let Some(v) = validate_name(job.metadata.name.as_deref().unwrap_or("")) {
        problems.push(v);
    }
    let mut cel_paths = Vec::new();
    if let Err(errors) = TrainingJob::validate_cel(&job) {
        for e in errors.iter() {
            cel_paths.push(e.field_path.clone());
            problems.push(Violation::new(e.field_path.clone(), e.message.clone()));
        }
    }
    // A problem the CEL rules already reported at the same node is not repeated.
    problems.extend(validate_spec(&job.spec).into_iter().filter(|v| !cel_paths.contains(&v.path)));
    if problems.is_empty() { Ok(job) } else { Err(problems) }
}
