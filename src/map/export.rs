//! `keyshift map` and `keyshift map export`: one lookup, or the whole mapping streamed with
//! COPY for bulk updates of external systems, in constant memory.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio_postgres::Client;

use super::catalog::{self, MapCatalog, MapTable, Source};
use crate::ident::{literal, qualified, quote};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// `table_name,legacy_id,uuid` with a header line
    Csv,
    /// One JSON object per line: {"table": ..., "legacy_id": ..., "uuid": ...}
    Jsonl,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}", crate::migrate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    #[error(
        "there is no id mapping in this database: no migration (run `keyshift expand` first), and no archive kept by `keyshift finalize --keep-map`"
    )]
    NoMapping,
    #[error("unknown table {name:?}: the mapped tables are {known}")]
    UnknownTable { name: String, known: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("unexpected COPY line from PostgreSQL: {0:?}")]
    Line(String),
}

/// The catalog, or why there is none.
pub async fn catalog(client: &Client) -> Result<MapCatalog, ExportError> {
    catalog::load(client).await?.ok_or(ExportError::NoMapping)
}

/// A table by `schema.table` or by bare name (through `public`, then any single match).
pub fn resolve<'a>(cat: &'a MapCatalog, name: &str) -> Result<&'a MapTable, ExportError> {
    let found = cat.resolve(name, &["public".to_string()]).map(|(_, t)| t);
    let found = found.or_else(|| {
        let mut m = cat.tables.iter().filter(|t| t.table == name);
        match (m.next(), m.next()) {
            (Some(t), None) => Some(t),
            _ => None,
        }
    });
    found.ok_or_else(|| ExportError::UnknownTable {
        name: name.to_string(),
        known: cat.names().join(", "),
    })
}

/// One id, either side: an integer looks up the uuid, a uuid looks up the legacy id.
/// Returns `(legacy_id, uuid)` or `None`.
pub async fn lookup_one(
    client: &Client,
    cat: &MapCatalog,
    t: &MapTable,
    id: &str,
) -> Result<Option<(i64, String)>, LookupError> {
    let row = if let Ok(l) = id.trim().parse::<i64>() {
        client.query_opt(&cat.by_legacy_sql(t), &[&vec![l]]).await?
    } else if let Ok(u) = uuid::Uuid::parse_str(id.trim()) {
        client
            .query_opt(&cat.by_uuid_sql(t), &[&vec![u.to_string()]])
            .await?
    } else {
        return Err(LookupError::BadId(id.to_string()));
    };
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{}", crate::migrate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("{0:?} is neither an integer id nor a uuid")]
    BadId(String),
}

/// Streams the mapping of `tables` (all when empty) to `output` (stdout when `None`);
/// returns the rows written. A file is written beside its final name and renamed at the
/// end, so an interrupted export never leaves a truncated file that looks complete.
pub async fn export(
    client: &Client,
    tables: &[String],
    format: ExportFormat,
    output: Option<&Path>,
) -> Result<u64, ExportError> {
    let cat = catalog(client).await?;
    let chosen: Vec<&MapTable> = if tables.is_empty() {
        cat.tables.iter().collect()
    } else {
        tables
            .iter()
            .map(|n| resolve(&cat, n))
            .collect::<Result<_, _>>()?
    };
    let estimate = estimate_rows(client, &cat, &chosen).await.unwrap_or(0);
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::with_draw_target(Some(estimate), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{msg:24} [{bar:30}] {human_pos}/{human_len} rows, {per_sec}, eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ExportError::Io { path, source }
    };
    let rows = match output {
        None => {
            let mut out = BufWriter::with_capacity(1 << 16, tokio::io::stdout());
            let n = write_all(client, &cat, &chosen, format, &mut out, &bar).await?;
            out.flush().await.map_err(io(Path::new("stdout")))?;
            n
        }
        Some(path) => {
            let partial = partial_path(path);
            let file = tokio::fs::File::create(&partial)
                .await
                .map_err(io(&partial))?;
            let mut out = BufWriter::with_capacity(1 << 16, file);
            let n = match write_all(client, &cat, &chosen, format, &mut out, &bar).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&partial).await;
                    return Err(e);
                }
            };
            out.flush().await.map_err(io(&partial))?;
            out.get_mut().sync_all().await.map_err(io(&partial))?;
            tokio::fs::rename(&partial, path).await.map_err(io(path))?;
            n
        }
    };
    bar.finish_and_clear();
    Ok(rows)
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

async fn estimate_rows(
    client: &Client,
    cat: &MapCatalog,
    tables: &[&MapTable],
) -> Result<u64, tokio_postgres::Error> {
    let mut total = 0u64;
    for t in tables {
        let rel = match cat.source {
            Source::Live => qualified(&t.schema, &t.table),
            Source::Archive => "keyshift.id_map_archive".into(),
        };
        let n: f64 = client
            .query_one(
                "SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = $1::regclass",
                &[&rel],
            )
            .await?
            .get(0);
        total += n as u64;
    }
    Ok(total)
}

fn copy_sql(cat: &MapCatalog, t: &MapTable) -> String {
    match cat.source {
        Source::Live => format!(
            "COPY (SELECT {l}::bigint, {u} FROM {tbl} WHERE {l} IS NOT NULL AND {u} IS NOT NULL) TO STDOUT",
            l = quote(&t.legacy_column),
            u = quote(&t.uuid_column),
            tbl = qualified(&t.schema, &t.table)
        ),
        Source::Archive => format!(
            "COPY (SELECT legacy_id, uuid FROM keyshift.id_map_archive WHERE table_name = {} ORDER BY legacy_id) TO STDOUT",
            literal(&t.name)
        ),
    }
}

async fn write_all<W: AsyncWrite + Unpin>(
    client: &Client,
    cat: &MapCatalog,
    tables: &[&MapTable],
    format: ExportFormat,
    out: &mut W,
    bar: &ProgressBar,
) -> Result<u64, ExportError> {
    let io = |source| ExportError::Io {
        path: "output".into(),
        source,
    };
    if format == ExportFormat::Csv {
        out.write_all(b"table_name,legacy_id,uuid\n")
            .await
            .map_err(io)?;
    }
    let mut rows = 0u64;
    let mut line = Vec::with_capacity(128);
    for t in tables {
        bar.set_message(t.name.clone());
        // Each line of COPY's text format here is `<integer>\t<uuid>`: neither needs escaping.
        let prefix = match format {
            ExportFormat::Csv => format!("{},", csv_field(&t.name)),
            ExportFormat::Jsonl => format!(
                "{{\"table\":{},\"legacy_id\":",
                serde_json::Value::String(t.name.clone())
            ),
        };
        let stream = client.copy_out(&copy_sql(cat, t)).await?;
        futures_util::pin_mut!(stream);
        let mut rest: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            rest.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(nl) = rest[start..].iter().position(|&b| b == b'\n') {
                let rec = &rest[start..start + nl];
                start += nl + 1;
                let Some(tab) = rec.iter().position(|&b| b == b'\t') else {
                    return Err(ExportError::Line(String::from_utf8_lossy(rec).into()));
                };
                let (legacy, uuid) = (&rec[..tab], &rec[tab + 1..]);
                line.clear();
                line.extend_from_slice(prefix.as_bytes());
                line.extend_from_slice(legacy);
                match format {
                    ExportFormat::Csv => {
                        line.push(b',');
                        line.extend_from_slice(uuid);
                        line.push(b'\n');
                    }
                    ExportFormat::Jsonl => {
                        line.extend_from_slice(b",\"uuid\":\"");
                        line.extend_from_slice(uuid);
                        line.extend_from_slice(b"\"}\n");
                    }
                }
                out.write_all(&line).await.map_err(io)?;
                rows += 1;
                if rows % 8192 == 0 {
                    bar.set_position(rows);
                }
            }
            rest.drain(..start);
        }
    }
    bar.set_position(rows);
    Ok(rows)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
