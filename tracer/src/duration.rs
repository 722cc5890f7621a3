//! Human durations for flags and the config file: `500ms`, `1s`, `2m`, `1h`.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("invalid duration {0:?}: use a number with a unit, e.g. 500ms, 1s, 2m")]
    Invalid(String),
    #[error("duration {0:?} must be greater than zero")]
    Zero(String),
}

/// Parses a positive duration with a unit suffix (`ms`, `s`, `m`, `h`).
/// A bare number is rejected: `--poll-interval 1` is ambiguous.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| DurationError::Invalid(text.to_owned()))?;
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| DurationError::Invalid(text.to_owned()))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(DurationError::Invalid(text.to_owned())),
    };
    if !seconds.is_finite() || seconds > 1e9 {
        return Err(DurationError::Invalid(text.to_owned()));
    }
    if seconds <= 0.0 {
        return Err(DurationError::Zero(text.to_owned()));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Like [`parse_duration`], for settings where zero means "off".
pub fn parse_duration_or_zero(text: &str) -> Result<Duration, DurationError> {
    match parse_duration(text) {
        Err(DurationError::Zero(_)) => Ok(Duration::ZERO),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_off_only_where_allowed() {
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration_or_zero("0s").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration_or_zero("15s").unwrap(),
            Duration::from_secs(15)
        );
        assert!(parse_duration_or_zero("15").is_err());
        assert!(parse_duration_or_zero("-1s").is_err());
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn rejects_bare_numbers_unknown_units_and_zero() {
        assert!(matches!(
            parse_duration("1"),
            Err(DurationError::Invalid(_))
        ));
        assert!(matches!(
            parse_duration("1d"),
            Err(DurationError::Invalid(_))
        ));
        assert!(matches!(
            parse_duration("s"),
            Err(DurationError::Invalid(_))
        ));
        assert!(matches!(parse_duration(""), Err(DurationError::Invalid(_))));
        assert!(matches!(parse_duration("0s"), Err(DurationError::Zero(_))));
    }
}
