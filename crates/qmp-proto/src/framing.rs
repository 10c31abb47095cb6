//! Newline-delimited framing with a hard cap on line length.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Why reading a line failed.
#[derive(Debug)]
pub(crate) enum LineError {
    /// The socket failed.
    Io(std::io::Error),
    /// The line grew past the cap without a newline.
    TooLong(usize),
}

/// Reads one line (without its `\n`, trailing `\r` removed) into `buf`, appending.
///
/// Returns `Ok(false)` at EOF (a partial last line without newline is discarded).
/// Cancel-safe as long as the caller keeps `buf` across calls: bytes already taken
/// from the reader are kept in `buf`.
pub(crate) async fn read_line_capped<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> Result<bool, LineError> {
    loop {
        let avail = r.fill_buf().await.map_err(LineError::Io)?;
        if avail.is_empty() {
            return Ok(false);
        }
        if let Some(i) = avail.iter().position(|&b| b == b'\n') {
            if buf.len() + i > cap {
                r.consume(i + 1);
                return Err(LineError::TooLong(cap));
            }
            buf.extend_from_slice(&avail[..i]);
            r.consume(i + 1);
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(true);
        }
        let n = avail.len();
        if buf.len() + n > cap {
            r.consume(n);
            return Err(LineError::TooLong(cap));
        }
        buf.extend_from_slice(avail);
        r.consume(n);
    }
}

/// The instant `t` from now; a `t` too large to represent (e.g. `Duration::MAX`, meaning
/// "no limit") gives a deadline about 30 years away instead of overflowing.
pub(crate) fn deadline_after(t: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(t)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(30 * 365 * 86_400))
}

/// A short, printable excerpt of a raw line for log messages.
pub(crate) fn excerpt(line: &[u8]) -> String {
    const MAX: usize = 200;
    let s = String::from_utf8_lossy(&line[..line.len().min(MAX)]);
    if line.len() > MAX {
        format!("{s}... ({} bytes)", line.len())
    } else {
        s.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    async fn lines(input: &[u8], cap: usize) -> Vec<Result<Option<Vec<u8>>, String>> {
        let mut r = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            match read_line_capped(&mut r, &mut buf, cap).await {
                Ok(true) => out.push(Ok(Some(buf))),
                Ok(false) => {
                    out.push(Ok(None));
                    return out;
                }
                Err(e) => out.push(Err(format!("{e:?}"))),
            }
            if out.len() > 20 {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn splits_lines_across_small_buffers() {
        let got = lines(b"{\"a\":1}\r\nxyz\n\npartial", 100).await;
        assert_eq!(
            got,
            vec![
                Ok(Some(b"{\"a\":1}".to_vec())),
                Ok(Some(b"xyz".to_vec())),
                Ok(Some(b"".to_vec())),
                Ok(None)
            ]
        );
    }

    #[tokio::test]
    async fn over_long_line_is_an_error() {
        let got = lines(b"0123456789abcdef\nok\n", 8).await;
        assert!(
            matches!(got[0], Err(ref e) if e.contains("TooLong")),
            "{got:?}"
        );
    }

    #[test]
    fn excerpt_is_bounded() {
        assert_eq!(excerpt(b"abc"), "abc");
        let long = vec![b'x'; 1000];
        assert!(excerpt(&long).ends_with("(1000 bytes)"));
    }
}
