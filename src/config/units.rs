//! Parsers for the small value languages of the config file: durations and status ranges.

use std::time::Duration;

/// Parses `500ms`, `2s`, `1m`, `1h`, `365d` (and `0`). Fractions are allowed (`1.5s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration \"{text}\" has no unit (use ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration \"{text}\" (expected e.g. 500ms, 2s, 1m)"))?;
    let seconds_per_unit = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => {
            return Err(format!(
                "invalid duration unit \"{unit}\" in \"{text}\" (use ms, s, m, h or d)"
            ))
        }
    };
    let seconds = value * seconds_per_unit;
    if !seconds.is_finite() || seconds > 2.0 * 365.0 * 24.0 * 3600.0 {
        return Err(format!("duration \"{text}\" is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// An inclusive range of HTTP status codes, e.g. `200-399` or `204`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub low: u16,
    pub high: u16,
}

impl StatusRange {
    /// True when `status` falls inside the range.
    pub fn contains(&self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

impl std::fmt::Display for StatusRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// Parses `200-399` or a single code `200`.
pub fn parse_status_range(text: &str) -> Result<StatusRange, String> {
    let parse_code = |part: &str| -> Result<u16, String> {
        part.trim()
            .parse::<u16>()
            .ok()
            .filter(|code| (100..=599).contains(code))
            .ok_or_else(|| format!("invalid status range \"{text}\" (expected e.g. 200-399)"))
    };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (parse_code(low)?, parse_code(high)?),
        None => {
            let code = parse_code(text)?;
            (code, code)
        }
    };
    if low > high {
        return Err(format!(
            "invalid status range \"{text}\" (low end above high end)"
        ));
    }
    Ok(StatusRange { low, high })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("365d"), Ok(Duration::from_secs(365 * 86400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("2 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999h").is_err());
    }

    #[test]
    fn status_ranges() {
        let range = parse_status_range("200-399").unwrap();
        assert!(range.contains(200) && range.contains(399) && !range.contains(400));
        assert_eq!(
            parse_status_range("204").unwrap(),
            StatusRange {
                low: 204,
                high: 204
            }
        );
        assert!(parse_status_range("399-200").is_err());
        assert!(parse_status_range("abc").is_err());
        assert!(parse_status_range("200-999").is_err());
    }
}
