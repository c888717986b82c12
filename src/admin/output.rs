//! What `cache-admin` prints for people: aligned tables and fields, times and sizes;
//! and the units people type: durations (`30d`) and sizes (`500GiB`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Rows under headers, each column as wide as its widest cell.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row, a cell per header.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    /// The table as text, two spaces between columns, no trailing spaces.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        let mut out = String::new();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `name: value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

/// A time in seconds since the epoch, as RFC 3339 in UTC.
pub fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// An optional time, `-` when absent.
pub fn maybe_time(secs: Option<u64>) -> String {
    secs.map(time).unwrap_or_else(|| "-".into())
}

/// A size in bytes, in binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration in seconds, as people write it.
pub fn duration(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// Seconds since the epoch, now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A limit given on the command line: a value, or `none` to remove the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// This many seconds or bytes.
    Value(u64),
    /// No limit.
    None,
}

impl Limit {
    /// As the API takes it: the number, or `None` for no limit.
    pub fn value(self) -> Option<u64> {
        match self {
            Self::Value(v) => Some(v),
            Self::None => None,
        }
    }
}

/// `30d`, `12h`, `2w 3d`, or `none`.
pub fn parse_age(s: &str) -> Result<Limit, String> {
    if s == "none" {
        return Ok(Limit::None);
    }
    humantime::parse_duration(s)
        .map(|d| Limit::Value(d.as_secs()))
        .map_err(|e| format!("{s:?} is not a duration such as 30d or 12h: {e}"))
}

/// `500GiB`, `2TB`, `1048576`, or `none`.
pub fn parse_limit_size(s: &str) -> Result<Limit, String> {
    if s == "none" {
        return Ok(Limit::None);
    }
    parse_size::parse_size(s)
        .map(Limit::Value)
        .map_err(|e| format!("{s:?} is not a size such as 500GiB: {e}"))
}

/// A duration such as `30d`, in seconds.
pub fn parse_expiry(s: &str) -> Result<u64, String> {
    match parse_age(s)? {
        Limit::Value(v) if v > 0 => Ok(v),
        _ => Err(format!("{s:?} is not a duration such as 30d")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let mut t = Table::new(&["NAME", "PATHS"]);
        t.row(vec!["main".into(), "3".into()]);
        t.row(vec!["a-long-name".into(), "12345".into()]);
        assert_eq!(
            t.render(),
            "NAME         PATHS\nmain         3\na-long-name  12345\n"
        );
    }

    #[test]
    fn units_parse_as_people_write_them() {
        assert_eq!(parse_age("30d"), Ok(Limit::Value(30 * 86400)));
        assert_eq!(parse_age("none"), Ok(Limit::None));
        assert_eq!(parse_limit_size("500GiB"), Ok(Limit::Value(500 << 30)));
        assert_eq!(
            parse_limit_size("2 TB"),
            Ok(Limit::Value(2_000_000_000_000))
        );
        assert!(parse_limit_size("lots").is_err());
        assert!(parse_expiry("0s").is_err());
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
    }
}
