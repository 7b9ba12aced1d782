//! A streaming `multipart/form-data` reader: fed the body chunk by chunk,
//! it hands each part's bytes on as they come, holding back no more than a
//! boundary's length, so an upload is never whole in memory.

/// What the reader found in the bytes fed so far.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A part begins: its form name, and its file name for a file.
    Part {
        /// `name` of its `Content-Disposition`.
        name: String,
        /// `filename`, for a file.
        filename: Option<String>,
    },
    /// Bytes of the current part.
    Data(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Preamble,
    AfterBoundary,
    Headers,
    Body,
    Done,
}

/// The most bytes a part's headers may take.
const MAX_HEADERS: usize = 16 * 1024;

/// The reader of one body.
pub struct Reader {
    delimiter: Vec<u8>,
    buf: Vec<u8>,
    state: State,
}

/// The boundary a `Content-Type` header names.
pub fn boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    param(params, "boundary").filter(|b| !b.is_empty())
}

/// The value of `key` among `; key=value` parameters (quotes removed).
fn param(params: &str, key: &str) -> Option<String> {
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(key)
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..=hay.len() - needle.len()]
            .iter()
            .position(|&b| b == first)
        {
            None => return None,
            Some(j) => {
                i += j;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

impl Reader {
    /// A reader for parts separated by `boundary`.
    pub fn new(boundary: &str) -> Self {
        Reader {
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            // The first boundary has no line break before it.
            buf: b"\r\n".to_vec(),
            state: State::Preamble,
        }
    }

    /// Reads `data`, appending what it found to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        if self.state == State::Done {
            return Ok(());
        }
        self.buf.extend_from_slice(data);
        loop {
            match self.state {
                State::Preamble => match find(&self.buf, &self.delimiter) {
                    Some(i) => {
                        self.buf.drain(..i + self.delimiter.len());
                        self.state = State::AfterBoundary;
                    }
                    None => {
                        let keep = self.delimiter.len().min(self.buf.len());
                        self.buf.drain(..self.buf.len() - keep);
                        return Ok(());
                    }
                },
                State::AfterBoundary => {
                    if self.buf.len() < 2 {
                        return Ok(());
                    }
                    if self.buf.starts_with(b"--") {
                        self.state = State::Done;
                        self.buf.clear();
                        return Ok(());
                    }
                    match find(&self.buf, b"\r\n") {
                        Some(i) if self.buf[..i].iter().all(|b| *b == b' ' || *b == b'\t') => {
                            self.buf.drain(..i + 2);
                            self.state = State::Headers;
                        }
                        Some(_) => return Err("a multipart boundary is followed by text".into()),
                        None if self.buf.len() > MAX_HEADERS => {
                            return Err("a multipart boundary is followed by text".into())
                        }
                        None => return Ok(()),
                    }
                }
                State::Headers => match find(&self.buf, b"\r\n\r\n") {
                    Some(i) => {
                        let head = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                        self.buf.drain(..i + 4);
                        let disposition = head
                            .split("\r\n")
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.trim()
                                    .eq_ignore_ascii_case("content-disposition")
                                    .then(|| v.to_string())
                            })
                            .ok_or("a multipart part has no Content-Disposition")?;
                        let params = disposition.split_once(';').map_or("", |(_, p)| p);
                        out.push(Event::Part {
                            name: param(params, "name").unwrap_or_default(),
                            filename: param(params, "filename"),
                        });
                        self.state = State::Body;
                    }
                    None if self.buf.len() > MAX_HEADERS => {
                        return Err("a multipart part's headers are too long".into())
                    }
                    None => return Ok(()),
                },
                State::Body => match find(&self.buf, &self.delimiter) {
                    Some(i) => {
                        if i > 0 {
                            out.push(Event::Data(self.buf[..i].to_vec()));
                        }
                        self.buf.drain(..i + self.delimiter.len());
                        self.state = State::AfterBoundary;
                    }
                    None => {
                        let safe = self.buf.len().saturating_sub(self.delimiter.len() - 1);
                        if safe > 0 {
                            out.push(Event::Data(self.buf[..safe].to_vec()));
                            self.buf.drain(..safe);
                        }
                        return Ok(());
                    }
                },
                State::Done => return Ok(()),
            }
        }
    }

    /// Whether the closing boundary was read.
    pub fn finished(&self) -> bool {
        self.state == State::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part: its name, file name and bytes.
    type Part = (String, Option<String>, Vec<u8>);

    fn read(body: &[u8], step: usize) -> (Vec<Part>, bool) {
        let mut r = Reader::new("XyZ");
        let mut events = Vec::new();
        for chunk in body.chunks(step) {
            r.feed(chunk, &mut events).unwrap();
        }
        let mut parts: Vec<Part> = Vec::new();
        for e in events {
            match e {
                Event::Part { name, filename } => parts.push((name, filename, Vec::new())),
                Event::Data(d) => parts.last_mut().unwrap().2.extend(d),
            }
        }
        (parts, r.finished())
    }

    #[test]
    fn parts_come_out_whole_however_the_body_is_cut() {
        let body = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{\"a\":1}\r\n{\"b\":\"--Xy\"}\n\r\n--XyZ--\r\n";
        for step in [1, 2, 3, 7, 64, body.len()] {
            let (parts, done) = read(body, step);
            assert!(done, "step {step}");
            assert_eq!(parts.len(), 2);
            assert_eq!(parts[0], ("purpose".into(), None, b"batch".to_vec()));
            assert_eq!(parts[1].0, "file");
            assert_eq!(parts[1].1.as_deref(), Some("in.jsonl"));
            assert_eq!(parts[1].2, b"{\"a\":1}\r\n{\"b\":\"--Xy\"}\n".to_vec());
        }
        assert_eq!(
            boundary("multipart/form-data; boundary=\"ab c\""),
            Some("ab c".into())
        );
        assert_eq!(boundary("application/json"), None);
    }

    #[test]
    fn a_body_without_its_closing_boundary_is_not_finished() {
        let (_, done) = read(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
            4,
        );
        assert!(!done);
    }
}
