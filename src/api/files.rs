//! `/v1/files`: uploads streamed to `api.files_dir` in chunks (never whole
//! in memory), their metadata in the queue's database.

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::multipart::{self, Event};
use super::{list as list_of, new_id, unix_now, Api, ApiError, Page};
use crate::config::{MAX_FILE_BYTES, MAX_FILE_LINES};
use crate::store::api::{Deleted, FileRow};

/// The file object as the SDK reads it.
pub fn object(f: &FileRow) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": null,
        "status_details": null,
    })
}

/// Counts the non-blank lines of what is written, line by line.
#[derive(Default)]
struct Lines {
    count: u64,
    blank: bool,
}

impl Lines {
    fn new() -> Self {
        Lines {
            count: 0,
            blank: true,
        }
    }

    fn read(&mut self, data: &[u8]) {
        for &b in data {
            match b {
                b'\n' => {
                    if !self.blank {
                        self.count += 1;
                    }
                    self.blank = true;
                }
                b' ' | b'\t' | b'\r' => {}
                _ => self.blank = false,
            }
        }
    }

    fn total(&self) -> u64 {
        self.count + u64::from(!self.blank)
    }
}

/// Where a part's bytes go.
enum Sink {
    File,
    Field(String, Vec<u8>),
    Skip,
}

/// What an upload wrote: its name, size and lines.
struct Written {
    filename: Option<String>,
    bytes: u64,
    lines: u64,
    purpose: Option<String>,
}

async fn receive(
    body: Body,
    boundary: &str,
    out: &mut tokio::fs::File,
) -> Result<Written, ApiError> {
    let mut reader = multipart::Reader::new(boundary);
    let mut stream = body.into_data_stream();
    let mut events = Vec::new();
    let mut sink = Sink::Skip;
    let mut w = Written {
        filename: None,
        bytes: 0,
        lines: 0,
        purpose: None,
    };
    let mut lines = Lines::new();
    let mut seen_file = false;
    let end_field = |sink: &mut Sink, w: &mut Written| {
        if let Sink::Field(name, value) = std::mem::replace(sink, Sink::Skip) {
            if name == "purpose" {
                w.purpose = Some(String::from_utf8_lossy(&value).trim().to_string());
            }
        }
    };
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid(None, format!("reading the upload: {e}")))?;
        reader
            .feed(&chunk, &mut events)
            .map_err(|e| ApiError::invalid(None, e))?;
        for e in events.drain(..) {
            match e {
                Event::Part { name, filename } => {
                    end_field(&mut sink, &mut w);
                    sink = if name == "file" && !seen_file {
                        seen_file = true;
                        w.filename = filename;
                        Sink::File
                    } else {
                        Sink::Field(name, Vec::new())
                    };
                }
                Event::Data(data) => match &mut sink {
                    Sink::File => {
                        w.bytes += data.len() as u64;
                        if w.bytes > MAX_FILE_BYTES {
                            return Err(ApiError::invalid(
                                Some("file"),
                                format!("the file is larger than {MAX_FILE_BYTES} bytes (200 MB), the most a batch input may have: split it into several batches"),
                            ));
                        }
                        lines.read(&data);
                        if lines.total() > MAX_FILE_LINES {
                            return Err(ApiError::invalid(
                                Some("file"),
                                format!("the file has more than {MAX_FILE_LINES} lines, the most requests a batch may have: split it into several batches"),
                            ));
                        }
                        out.write_all(&data).await?;
                    }
                    Sink::Field(_, value) => {
                        if value.len() + data.len() > 4096 {
                            sink = Sink::Skip;
                        } else {
                            value.extend_from_slice(&data);
                        }
                    }
                    Sink::Skip => {}
                },
            }
        }
    }
    end_field(&mut sink, &mut w);
    if !reader.finished() {
        return Err(ApiError::invalid(
            None,
            "the multipart body ended before its closing boundary",
        ));
    }
    if !seen_file {
        return Err(ApiError::invalid(
            Some("file"),
            "no `file` part in the upload",
        ));
    }
    out.flush().await?;
    out.sync_all().await?;
    w.lines = lines.total();
    Ok(w)
}

/// `POST /v1/files`: `purpose=batch` and `file`.
pub async fn upload(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(multipart::boundary)
        .ok_or_else(|| {
            ApiError::invalid(
                None,
                "send the file as multipart/form-data with `purpose` and `file`",
            )
        })?;
    let id = new_id("file-");
    let part = api.files_dir.join(format!("{id}.part"));
    let mut out = tokio::fs::File::create(&part).await?;
    let written = receive(body, &boundary, &mut out).await;
    drop(out);
    let written = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
    };
    if written.purpose.as_deref() != Some("batch") {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(ApiError::invalid(
            Some("purpose"),
            format!(
                "purpose is {:?}: this server takes files with purpose \"batch\"",
                written.purpose.unwrap_or_default()
            ),
        ));
    }
    let path = api.files_dir.join(&id);
    tokio::fs::rename(&part, &path).await?;
    let row = FileRow {
        id: id.clone(),
        filename: written.filename.unwrap_or_else(|| "upload.jsonl".into()),
        purpose: "batch".into(),
        bytes: written.bytes,
        lines: written.lines,
        created_at: unix_now(),
        path: id,
    };
    if let Err(e) = api.store.put_file(row.clone()).await {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(e.into());
    }
    Ok(Json(object(&row)).into_response())
}

async fn file_of(api: &Api, id: &str) -> Result<FileRow, ApiError> {
    api.store
        .file(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no file {id}")))
}

/// `GET /v1/files`: newest first, `after` and `limit` as the SDK pages.
/// `GET /v1/files`'s query: a page (as [`Page`]), and a purpose to keep to.
#[derive(Debug, serde::Deserialize)]
pub struct FilesQuery {
    /// The id of the last file of the previous page.
    pub after: Option<String>,
    /// Files per page.
    pub limit: Option<usize>,
    /// Only files of this purpose (`batch`, `batch_output`).
    pub purpose: Option<String>,
}

/// `GET /v1/files`, newest first; `purpose` keeps to one purpose.
pub async fn list(
    State(api): State<Api>,
    Query(q): Query<FilesQuery>,
) -> Result<Response, ApiError> {
    let page = Page {
        after: q.after,
        limit: q.limit,
    };
    let limit = page.limit();
    let rows = api.store.files(page.after, limit + 1, q.purpose).await?;
    Ok(list_of(rows.iter().map(object).collect(), limit))
}

/// `GET /v1/files/{id}`.
pub async fn get(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    Ok(Json(object(&file_of(&api, &id).await?)).into_response())
}

/// `GET /v1/files/{id}/content`: the bytes, streamed from disk.
pub async fn content(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let f = file_of(&api, &id).await?;
    let file = tokio::fs::File::open(api.files_dir.join(&f.path)).await?;
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`: 409 while a batch that has not ended reads it.
pub async fn delete(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    match api.store.delete_file(&id).await? {
        Deleted::Missing => Err(ApiError::not_found(format!("no file {id}"))),
        Deleted::InUse(batch) => Err(ApiError::conflict(format!(
            "file {id} is the input of {batch}, which has not ended: cancel it or wait for it first"
        ))),
        Deleted::Gone(f) => {
            let _ = tokio::fs::remove_file(api.files_dir.join(&f.path)).await;
            Ok(Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
        }
    }
}
