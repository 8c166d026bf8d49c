//! The audit trail: one JSON line per reload attempt and per admin change, appended to
//! `audit_log`, so "who changed what, when, and did it work" has one answer.
//!
//! Written synchronously by the reloader and the admin API (never on the request path); a
//! failure to write is logged and never blocks the change itself.

use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// Appends `entry` (with a `time` field added) as one line to `path`.
pub fn append(path: Option<&Path>, mut entry: Value) {
    let Some(path) = path else { return };
    if let Value::Object(fields) = &mut entry {
        fields.insert("time".to_string(), json!(rfc3339_now()));
    }
    let line = format!("{entry}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(error) = written {
        tracing::error!(path = %path.display(), %error, "cannot write the audit log");
    }
}

/// The current UTC time as RFC 3339 with milliseconds, e.g. `2026-11-29T09:21:14.123Z`.
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_millis())
}

/// Formats Unix seconds (UTC) as RFC 3339 (civil-from-days, Howard Hinnant's algorithm).
pub fn rfc3339(seconds: u64, millis: u32) -> String {
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        second_of_day / 3600,
        (second_of_day / 60) % 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_941_670, 123), "2026-11-29T08:41:10.123Z");
    }
}
