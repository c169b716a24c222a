//! The YAML directory source (`--config-dir DIR`).
//!
//! Every `*.yaml`, `*.yml` and `*.json` file below the directory (hidden names skipped, so a
//! mounted ConfigMap's `..data` is read once through its visible links) holds one or more
//! documents in Kubernetes shape. The directory is polled; when any file's identity, size or
//! modification time changes, everything is re-read and a whole new snapshot swapped in.
//! Only documents whose text changed are parsed again: the rest come from the previous read,
//! so one changed endpoint in a file of 10,000 services costs one document's parse.
//! A malformed document is reported with file, document number and reason; the rest loads.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{SnapshotHandle, SnapshotWriter};
use crate::objects::{Decoded, Object, ObjectKey};
use crate::snapshot::{Snapshot, SourceStatus};

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot read config directory {path}: {source}; does it exist and is it readable?")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What reading a directory produced.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Vec<Arc<Object>>,
    pub status: SourceStatus,
}

/// Parsed documents by their exact text, kept from one read of the directory to the next
/// (only those still present). Keyed by the text itself, not a hash of it: a collision would
/// serve the wrong object.
#[derive(Debug, Default)]
pub struct DocCache {
    docs: HashMap<Box<str>, Parsed>,
}

/// One document's outcome, cheap to copy.
#[derive(Clone, Debug)]
enum Parsed {
    Empty,
    Skipped(Arc<str>, Arc<str>),
    Object(Arc<Object>),
    Error(Arc<str>),
}

/// Read every document in the directory, once.
pub fn load_dir(dir: &Path) -> Result<Loaded, DirError> {
    load_dir_cached(dir, &mut DocCache::default())
}

/// Read every document in the directory, parsing only documents `cache` has not seen; the
/// cache is left holding exactly the documents of this read.
pub fn load_dir_cached(dir: &Path, cache: &mut DocCache) -> Result<Loaded, DirError> {
    let files = list_files(dir)?;
    let mut loaded = Loaded {
        status: SourceStatus {
            source: format!("dir:{}", dir.display()),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut seen: HashMap<ObjectKey, String> = HashMap::new();
    let mut next = DocCache::default();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => add_text(
                &file.display().to_string(),
                &text,
                &mut loaded,
                &mut seen,
                (cache, &mut next),
            ),
            Err(e) => loaded
                .status
                .errors
                .push(format!("{}: cannot read: {e}", file.display())),
        }
    }
    *cache = next;
    Ok(loaded)
}

/// Build a snapshot from YAML text as a file would hold it: for tests and fixtures.
pub fn snapshot_from_yaml(text: &str) -> Snapshot {
    let mut loaded = Loaded::default();
    let (mut previous, mut next) = (DocCache::default(), DocCache::default());
    add_text(
        "inline",
        text,
        &mut loaded,
        &mut HashMap::new(),
        (&mut previous, &mut next),
    );
    Snapshot::build(loaded.objects.iter().map(|o| &**o), loaded.status)
}

/// Add the documents of one file's text; `origin` names the file in messages. Documents found
/// in `previous` are not parsed again; every document goes into `next`.
fn add_text(
    origin: &str,
    text: &str,
    loaded: &mut Loaded,
    seen: &mut HashMap<ObjectKey, String>,
    (previous, next): (&mut DocCache, &mut DocCache),
) {
    for (index, doc) in split_documents(text).into_iter().enumerate() {
        let place = format!("{origin} document {}", index + 1);
        let parsed = match previous.docs.remove(doc) {
            Some(p) => p,
            None => match next.docs.get(doc) {
                Some(p) => p.clone(),
                None => parse_document(doc),
            },
        };
        match &parsed {
            Parsed::Empty => {}
            Parsed::Skipped(api_version, kind) => {
                debug!(%place, %api_version, %kind, "skipping a kind this program does not read");
                loaded
                    .status
                    .skipped
                    .push(format!("{place}: {api_version} {kind}"));
            }
            Parsed::Object(object) => {
                let key = object.key();
                if let Some(first) = seen.get(&key) {
                    loaded.status.warnings.push(format!(
                        "{place}: duplicate {key}, first defined at {first}: ignored"
                    ));
                } else {
                    seen.insert(key, place);
                    loaded.objects.push(object.clone());
                }
            }
            Parsed::Error(reason) => loaded.status.errors.push(format!("{place}: {reason}")),
        }
        next.docs.insert(doc.into(), parsed);
    }
}

/// Load the directory, publish the first snapshot, then keep polling it every `interval` and
/// publish a new snapshot whenever a file changes. Fails only if the first read fails.
pub async fn watch_dir(
    dir: PathBuf,
    interval: Duration,
) -> Result<(SnapshotHandle, tokio::task::JoinHandle<()>), DirError> {
    let (writer, handle) = super::channel();
    let (fingerprint, first, cache) = load_blocking(dir.clone(), DocCache::default()).await?;
    publish(&writer, first);
    let task = tokio::spawn(poll_loop(dir, interval, writer, fingerprint, cache));
    Ok((handle, task))
}

async fn poll_loop(
    dir: PathBuf,
    interval: Duration,
    writer: SnapshotWriter,
    mut last: u64,
    mut cache: DocCache,
) {
    let mut unreadable = false;
    loop {
        tokio::time::sleep(interval).await;
        let probe = dir.clone();
        let now = tokio::task::spawn_blocking(move || fingerprint(&probe))
            .await
            .unwrap_or(Ok(last));
        match now {
            Ok(f) if f == last => {}
            Ok(_) => match load_blocking(dir.clone(), std::mem::take(&mut cache)).await {
                Ok((f, loaded, c)) => {
                    last = f;
                    cache = c;
                    unreadable = false;
                    publish(&writer, loaded);
                }
                Err(e) => warn!("{e}; keeping the last snapshot"),
            },
            Err(e) if !unreadable => {
                unreadable = true;
                warn!("{e}; keeping the last snapshot until it is readable again");
            }
            Err(_) => {}
        }
    }
}

async fn load_blocking(
    dir: PathBuf,
    mut cache: DocCache,
) -> Result<(u64, Loaded, DocCache), DirError> {
    tokio::task::spawn_blocking(move || {
        // Fingerprint first: a change that lands during the read is seen on the next poll.
        let f = fingerprint(&dir)?;
        let loaded = load_dir_cached(&dir, &mut cache)?;
        Ok((f, loaded, cache))
    })
    .await
    .expect("directory load task panicked")
}

fn publish(writer: &SnapshotWriter, loaded: Loaded) {
    for e in &loaded.status.errors {
        warn!(error = %e, "rejected an object; the rest of the directory still loads");
    }
    for w in &loaded.status.warnings {
        warn!(warning = %w, "config conflict");
    }
    let snapshot = Snapshot::build(loaded.objects.iter().map(|o| &**o), loaded.status);
    info!(
        source = %snapshot.status.source,
        objects = snapshot.status.objects,
        services = snapshot.services.len(),
        service_entries = snapshot.service_entries.len(),
        errors = snapshot.status.errors.len(),
        "loaded config directory"
    );
    writer.publish(snapshot);
}

/// Split a multi-document YAML stream on `---` lines (a `---` at column 0 always starts a new
/// document in YAML, even after a block scalar) and stop at `...` end markers' following text.
pub fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker =
            bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") || bare == "...";
        if marker {
            docs.push(&text[start..offset]);
            // `--- value` keeps the value on the marker line as document content.
            start = if bare.len() > 3 && bare.starts_with("---") {
                offset + 3
            } else {
                offset + line.len()
            };
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    // The text before the first `---` only counts when it holds something.
    if docs.len() > 1 && is_blank(docs[0]) {
        docs.remove(0);
    }
    docs
}

fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    })
}

/// Parse and decode one document.
fn parse_document(doc: &str) -> Parsed {
    if is_blank(doc) {
        return Parsed::Empty;
    }
    let value: serde_json::Value = match serde_saphyr::from_str(doc) {
        Ok(v) => v,
        Err(e) => return Parsed::Error(format!("invalid YAML: {e}").into()),
    };
    if value.is_null() {
        return Parsed::Empty;
    }
    match Object::decode(value) {
        Ok(Decoded::Object(o)) => Parsed::Object(Arc::new(o)),
        Ok(Decoded::Skipped(api_version, kind)) => Parsed::Skipped(api_version.into(), kind.into()),
        Err(e) => Parsed::Error(e.to_string().into()),
    }
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>, DirError> {
    let mut out = Vec::new();
    walk(dir, &mut out, 0).map_err(|source| DirError::Unreadable {
        path: dir.to_path_buf(),
        source,
    })?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> std::io::Result<()> {
    // Bounded depth keeps a symlink loop from recursing forever.
    if depth > 8 {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // `metadata` follows symlinks, as a mounted ConfigMap needs.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(&path, out, depth + 1)?;
        } else if meta.is_file()
            && matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        {
            out.push(path);
        }
    }
    Ok(())
}

/// A hash of every file's path, identity, size and modification time.
fn fingerprint(dir: &Path) -> Result<u64, DirError> {
    let mut h = DefaultHasher::new();
    for path in list_files(dir)? {
        path.hash(&mut h);
        if let Ok(meta) = std::fs::metadata(&path) {
            meta.len().hash(&mut h);
            meta.modified().ok().hash(&mut h);
            #[cfg(unix)]
            std::os::unix::fs::MetadataExt::ino(&meta).hash(&mut h);
        }
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents() {
        assert_eq!(
            split_documents("a: 1\n---\nb: 2\n"),
            vec!["a: 1\n", "b: 2\n"]
        );
        assert_eq!(split_documents("---\na: 1\n"), vec!["a: 1\n"]);
        assert_eq!(split_documents("a: 1\n...\n"), vec!["a: 1\n", ""]);
        assert_eq!(
            split_documents("a: |\n  x\n  ---\n"),
            vec!["a: |\n  x\n  ---\n"]
        );
        assert_eq!(split_documents("--- {a: 1}\n"), vec![" {a: 1}\n"]);
        assert_eq!(
            split_documents("# c\n---\na: 1\r\n---\r\nb: 2"),
            vec!["a: 1\r\n", "b: 2"]
        );
    }

    #[test]
    fn bad_documents_are_reported_and_the_rest_loads() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: s1, namespace: ns}\nspec: {ports: [{port: 80}]}\n\
             ---\nthis: [is not closed\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {hots: x}\n\
             ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: s1, namespace: ns}\n",
        )
        .unwrap();
        std::fs::write(d.path().join(".hidden.yaml"), "garbage: [").unwrap();
        std::fs::write(d.path().join("notes.txt"), "garbage: [").unwrap();
        let loaded = load_dir(d.path()).unwrap();
        assert_eq!(loaded.objects.len(), 1);
        let errs = &loaded.status.errors;
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].contains("a.yaml document 2: invalid YAML"),
            "{errs:?}"
        );
        assert!(
            errs[1].contains("a.yaml document 3: invalid DestinationRule"),
            "{errs:?}"
        );
        assert!(errs[1].contains("hots"), "{errs:?}");
        assert!(loaded.status.skipped[0].contains("document 4: apps/v1 Deployment"));
        assert!(loaded.status.warnings[0].contains("document 5: duplicate Service/ns/s1"));
    }

    #[test]
    fn a_reread_parses_only_the_documents_that_changed() {
        let d = tempfile::tempdir().unwrap();
        let svc = |name: &str, port: u16| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{ports: [{{port: {port}}}]}}\n"
            )
        };
        let file = d.path().join("a.yaml");
        std::fs::write(
            &file,
            [svc("a", 80), svc("b", 80), svc("c", 80)].join("---\n"),
        )
        .unwrap();
        let mut cache = DocCache::default();
        let first = load_dir_cached(d.path(), &mut cache).unwrap();
        std::fs::write(&file, [svc("a", 80), svc("b", 81)].join("---\n")).unwrap();
        let second = load_dir_cached(d.path(), &mut cache).unwrap();
        assert_eq!(second.objects.len(), 2);
        // Unchanged: the very same parsed object. Changed: parsed again.
        assert!(Arc::ptr_eq(&first.objects[0], &second.objects[0]));
        assert!(!Arc::ptr_eq(&first.objects[1], &second.objects[1]));
        let snapshot = Snapshot::build(second.objects.iter().map(|o| &**o), second.status);
        assert_eq!(snapshot.service("ns", "b").unwrap().ports[0].port, 81);
        assert!(snapshot.service("ns", "c").is_none());
        // The cache holds this read's documents only.
        assert_eq!(cache.docs.len(), 2);
    }

    #[test]
    fn missing_dir_is_a_clear_error() {
        let e = load_dir(Path::new("/nonexistent/mesh")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/mesh"), "{e}");
    }
}
