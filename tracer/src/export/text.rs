//! The exposition's data model and its text writer. A family's samples
//! carry their label block already rendered: one allocation per series
//! instead of the two per label (plus a protobuf message per series) that
//! the prometheus crate's `proto` model costs, which at 2000 taps (34k
//! series) was most of a scrape's CPU. The output is byte for byte what the
//! crate's `TextEncoder` writes for the same families; a test holds the two
//! together, and the crate's `MetricType` names the kinds.

use std::fmt::Write as _;

pub use prometheus::proto::MetricType;

/// One metric family: its samples in exposition order.
#[derive(Debug, Clone)]
pub struct Family {
    name: String,
    help: String,
    kind: MetricType,
    samples: Vec<Sample>,
}

/// One series: `name="value",...` (escaped, without braces) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    labels: String,
    value: f64,
}

impl Family {
    pub fn new(name: &str, help: &str, kind: MetricType) -> Self {
        Self {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            samples: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn push(&mut self, sample: Sample) {
        self.samples.push(sample);
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Keeps only the samples `keep` accepts.
    pub fn retain(&mut self, keep: impl FnMut(&Sample) -> bool) {
        self.samples.retain(keep);
    }

    /// `# HELP`, `# TYPE` and one line per sample; nothing for a family
    /// without samples (the crate's encoder refuses those).
    pub fn write_to(&self, out: &mut String) {
        if self.samples.is_empty() {
            return;
        }
        if !self.help.is_empty() {
            out.push_str("# HELP ");
            out.push_str(&self.name);
            out.push(' ');
            push_escaped(out, &self.help, false);
            out.push('\n');
        }
        out.push_str("# TYPE ");
        out.push_str(&self.name);
        out.push(' ');
        out.push_str(kind_name(self.kind));
        out.push('\n');
        for sample in &self.samples {
            out.push_str(&self.name);
            if !sample.labels.is_empty() {
                out.push('{');
                out.push_str(&sample.labels);
                out.push('}');
            }
            // f64's Display, as the crate writes values ("3", "12.5").
            let _ = writeln!(out, " {}", sample.value);
        }
    }
}

impl Sample {
    pub fn new(pairs: &[(&str, &str)], value: f64) -> Self {
        let mut labels =
            String::with_capacity(pairs.iter().map(|(n, v)| n.len() + v.len() + 4).sum());
        for (i, (name, value)) in pairs.iter().enumerate() {
            if i > 0 {
                labels.push(',');
            }
            labels.push_str(name);
            labels.push_str("=\"");
            push_escaped(&mut labels, value, true);
            labels.push('"');
        }
        Self { labels, value }
    }

    /// Whether the series has label `name` with exactly `value`.
    pub fn has_label(&self, name: &str, value: &str) -> bool {
        let mut wanted = String::new();
        wanted.push_str(name);
        wanted.push_str("=\"");
        push_escaped(&mut wanted, value, true);
        wanted.push('"');
        // Pairs are separated by ',' outside quotes; a value's own ',' or
        // '=' cannot start a match because the match must begin a pair.
        let mut rest = self.labels.as_str();
        while !rest.is_empty() {
            if rest.starts_with(&wanted)
                && matches!(rest.as_bytes().get(wanted.len()), None | Some(b','))
            {
                return true;
            }
            match next_pair(rest) {
                Some(next) => rest = next,
                None => return false,
            }
        }
        false
    }
}

/// The text after the pair `labels` starts with (skipping its quoted,
/// escaped value), or None at the last pair.
fn next_pair(labels: &str) -> Option<&str> {
    let bytes = labels.as_bytes();
    let open = labels.find('"')?;
    let mut at = open + 1;
    while at < bytes.len() {
        match bytes[at] {
            b'\\' => at += 2,
            b'"' => break,
            _ => at += 1,
        }
    }
    // `at` is the closing quote; a ',' follows unless this was the last.
    labels
        .get(at + 2..)
        .filter(|_| bytes.get(at + 1) == Some(&b','))
}

fn kind_name(kind: MetricType) -> &'static str {
    match kind {
        MetricType::COUNTER => "counter",
        MetricType::GAUGE => "gauge",
        MetricType::SUMMARY => "summary",
        MetricType::UNTYPED => "untyped",
        MetricType::HISTOGRAM => "histogram",
    }
}

/// The text format's escaping: backslash and newline always, the double
/// quote inside label values.
fn push_escaped(out: &mut String, text: &str, quote: bool) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{
        proto::{Counter, Gauge, LabelPair, Metric, MetricFamily},
        Encoder, TextEncoder,
    };

    /// The same family in the crate's model.
    fn as_proto(family: &Family, pairs: &[Vec<(&str, &str)>]) -> MetricFamily {
        let mut proto = MetricFamily::default();
        proto.set_name(family.name.clone());
        proto.set_help(family.help.clone());
        proto.set_field_type(family.kind);
        for (sample, pairs) in family.samples.iter().zip(pairs) {
            let mut metric = Metric::default();
            metric.set_label(
                pairs
                    .iter()
                    .map(|(name, value)| {
                        let mut pair = LabelPair::default();
                        pair.set_name((*name).to_owned());
                        pair.set_value((*value).to_owned());
                        pair
                    })
                    .collect(),
            );
            match family.kind {
                MetricType::GAUGE => {
                    let mut gauge = Gauge::default();
                    gauge.set_value(sample.value);
                    metric.set_gauge(gauge);
                }
                _ => {
                    let mut counter = Counter::default();
                    counter.set_value(sample.value);
                    metric.set_counter(counter);
                }
            }
            proto.mut_metric().push(metric);
        }
        proto
    }

    #[test]
    fn writes_exactly_what_the_crates_text_encoder_writes() {
        let label_sets: Vec<Vec<(&str, &str)>> = vec![
            vec![],
            vec![("iface", "tap0"), ("direction", "to_vm")],
            vec![("vm_name", "a \"quoted\" name"), ("reason", "back\\slash")],
            vec![("project", "line\nbreak"), ("uuid", "")],
            vec![("name", "ünïcode, = and }")],
        ];
        let values = [0.0, 3.0, 12.5, 1e21, 0.1, f64::NAN];
        let mut families = Vec::new();
        for (i, kind) in [MetricType::COUNTER, MetricType::GAUGE]
            .into_iter()
            .enumerate()
        {
            let help = if i == 0 {
                "plain help"
            } else {
                "help with \\ and\nnewline and \"quotes\""
            };
            let mut family = Family::new(&format!("hvnet_test_{i}"), help, kind);
            for (pairs, value) in label_sets.iter().zip(values) {
                family.push(Sample::new(pairs, value));
            }
            families.push(family);
        }
        let mut ours = String::new();
        for family in &families {
            family.write_to(&mut ours);
        }
        let protos: Vec<MetricFamily> = families.iter().map(|f| as_proto(f, &label_sets)).collect();
        let mut theirs = Vec::new();
        TextEncoder::new()
            .encode(&protos, &mut theirs)
            .expect("the crate encodes these families");
        assert_eq!(ours, String::from_utf8(theirs).expect("utf-8"));
    }

    #[test]
    fn an_empty_family_writes_nothing() {
        let mut out = String::new();
        Family::new("hvnet_nothing", "help", MetricType::GAUGE).write_to(&mut out);
        assert_eq!(out, "");
    }

    #[test]
    fn has_label_matches_whole_pairs_only() {
        let sample = Sample::new(
            &[
                ("reason", "source=\"tracepoint\",x"),
                ("source", "tracepoint"),
            ],
            1.0,
        );
        assert!(sample.has_label("source", "tracepoint"));
        assert!(sample.has_label("reason", "source=\"tracepoint\",x"));
        assert!(!sample.has_label("source", "tracepoin"));
        assert!(!sample.has_label("ource", "tracepoint"));
        let decoy = Sample::new(&[("reason", "source=\"tracepoint\"")], 1.0);
        assert!(!decoy.has_label("source", "tracepoint"));
        assert!(!Sample::new(&[], 0.0).has_label("source", "tracepoint"));
    }
}
