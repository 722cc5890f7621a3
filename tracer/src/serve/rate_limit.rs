//! exporter-toolkit's `rate_limit` (`interval`, `burst`): one token bucket
//! for the whole endpoint; a request without a token gets 429.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// A token bucket: one token every `interval`, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    interval: Duration,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(interval: Duration, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            interval,
            burst,
            state: Mutex::new((burst, now)),
        }
    }

    /// Takes a token if one is there.
    pub fn allow(&self, now: Instant) -> bool {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = *state;
        let earned =
            now.saturating_duration_since(last).as_secs_f64() / self.interval.as_secs_f64();
        let tokens = (tokens + earned).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            true
        } else {
            *state = (tokens, now);
            false
        }
    }
}

/// A Go `time.Duration` as YAML carries it: "1s", "1m30s", "250ms", "0".
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(number_end);
        let value: f64 = number.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = next;
    }
    (total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        for bad in ["", "1", "1d", "s", "1s2"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_bucket_allows_a_burst_then_one_per_interval() {
        let start = Instant::now();
        let bucket = TokenBucket::new(Duration::from_secs(1), 3, start);
        assert!((0..3).all(|_| bucket.allow(start)));
        assert!(!bucket.allow(start));
        assert!(!bucket.allow(start + Duration::from_millis(500)));
        assert!(bucket.allow(start + Duration::from_millis(1100)));
        assert!(!bucket.allow(start + Duration::from_millis(1200)));
        // Idle time saves up no more than the burst.
        let later = start + Duration::from_secs(60);
        assert!((0..3).all(|_| bucket.allow(later)));
        assert!(!bucket.allow(later));
    }
}
